"""Triton flash attention (causal, sliding window, full; GQA; varlen) vs the fp64 reference."""

import pytest
import torch

from memzoo.kernels.attention import attention
from memzoo.kernels.attention.reference import attention_ref
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn


def make_inputs(B, T, H, Hkv, D, *, seed):
    return (
        randn(B, T, H, D, seed=seed),
        randn(B, T, Hkv, D, seed=seed + 1),
        randn(B, T, Hkv, D, seed=seed + 2),
    )


def run(fn, inputs, dtype, seed=11):
    """fn on leaf copies in `dtype`; returns o and the input gradients for a random dO."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    o = fn(*leaves)
    (o.double() * randn(*o.shape, seed=seed, dtype=torch.float64)).sum().backward()
    return o, [t.grad for t in leaves]


CASES = [
    pytest.param(T, D, H, Hkv, window, id=f"T{T}-D{D}-H{H}-Hkv{Hkv}-w{window}")
    for T, D in ((1, 16), (17, 32), (64, 64), (130, 32))
    for H, Hkv in ((1, 1), (4, 2))
    for window in (None, 1, 16, 64, 200)
    if not (T == 1 and window not in (None, 1))  # every window is the same at T = 1
]


@pytest.mark.parametrize("T,D,H,Hkv,window", CASES)
def test_causal_and_windowed_match_reference(T, D, H, Hkv, window):
    inputs = make_inputs(2 if T < 100 else 1, T, H, Hkv, D, seed=T + D + (window or 0))
    scale = D**-0.5

    def triton_fn(q, k, v):
        return attention(q, k, v, window=window, backend="triton")

    def ref_fn(q, k, v):
        return attention_ref(q, k, v, causal=True, window=window, scale=scale)

    o, grads = run(triton_fn, inputs, torch.float32)
    o_ref, grads_ref = run(ref_fn, inputs, torch.float64)
    assert o.dtype == torch.float32
    assert_close("o", o_ref, o, 1e-4)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, 1e-4)


@pytest.mark.parametrize("H,Hkv", [(1, 1), (4, 2)])
def test_full_non_causal_matches_reference(H, Hkv):
    inputs = make_inputs(2, 70, H, Hkv, 32, seed=5)
    o, grads = run(lambda q, k, v: attention(q, k, v, causal=False, backend="triton"), inputs,
                   torch.float32)  # fmt: skip
    o_ref, grads_ref = run(
        lambda q, k, v: attention_ref(q, k, v, causal=False, window=None, scale=32**-0.5),
        inputs, torch.float64,
    )  # fmt: skip
    assert_close("o", o_ref, o, 1e-4)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, 1e-4)


def test_fp16_matches_reference():
    inputs = make_inputs(1, 100, 4, 2, 64, seed=9)
    o, grads = run(lambda q, k, v: attention(q, k, v, window=32, backend="triton"), inputs,
                   torch.float16)  # fmt: skip
    half = [t.half().double() for t in inputs]
    o_ref, grads_ref = run(
        lambda q, k, v: attention_ref(q, k, v, causal=True, window=32, scale=64**-0.5),
        half, torch.float64,
    )  # fmt: skip
    assert o.dtype == torch.float16
    assert_close("o", o_ref, o, 2e-3)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, 5e-3)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 8), (False, None)])
def test_varlen_equals_per_sequence(causal, window):
    lengths = [1, 70, 5, 64, 2]
    inputs = make_inputs(1, sum(lengths), 4, 2, 16, seed=3)
    cu = cu_seqlens_from_lengths(lengths)

    def packed(q, k, v):
        return attention(q, k, v, causal=causal, window=window, cu_seqlens=cu, backend="triton")

    o, grads = run(packed, inputs, torch.float32)
    offsets = cu.tolist()
    dO = randn(*o.shape, seed=11, dtype=torch.float64)
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        part = [t[:, start:end].detach().float().requires_grad_() for t in inputs]
        o_n = attention(*part, causal=causal, window=window, backend="triton")
        (o_n.double() * dO[:, start:end]).sum().backward()
        assert_close(f"o[{n}]", o_n, o[:, start:end], 1e-5)
        for name, t, g in zip(("dq", "dk", "dv"), part, grads, strict=True):
            assert_close(f"{name}[{n}]", t.grad, g[:, start:end], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 256])
def test_cuda_backends_agree(dtype, window):
    q, k, v = (t.cuda().to(dtype) for t in make_inputs(2, 1000, 8, 2, 64, seed=1))
    o_triton = attention(q, k, v, window=window, backend="triton")
    o_torch = attention(q, k, v, window=window, backend="torch")
    o_ref = attention_ref(
        q.double(), k.double(), v.double(), causal=True, window=window, scale=64**-0.5
    )
    assert_close("triton", o_ref, o_triton, 1e-2)
    assert_close("torch", o_ref, o_torch, 1e-2)
    assert_close("auto", o_ref, attention(q, k, v, window=window), 1e-2)
