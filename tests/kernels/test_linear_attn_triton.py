"""Triton gated linear attention (chunked and recurrent) against the fp64 references."""

import pytest
import torch

from memzoo.kernels.linear_attn import linear_attn, linear_attn_step
from memzoo.kernels.linear_attn.reference import linear_attn_quadratic_ref
from memzoo.kernels.linear_attn.triton import SUFFIX_BLOCK, _reverse_cumsum_per_sequence
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn

RATIO = {torch.float32: 1e-4, torch.float16: 5e-3}


def make_inputs(B, T, H, K, V, *, seed, use_g, normalize, num_states=None, decay=0.5):
    """fp64 q, k, v, g, initial state. Normalised attention gets positive features."""
    q, k = randn(B, T, H, K, seed=seed), randn(B, T, H, K, seed=seed + 1)
    if normalize:
        q, k = q.abs(), k.abs()
    v = randn(B, T, H, V, seed=seed + 2)
    g = -randn(B, T, H, seed=seed + 3).abs() * decay if use_g else None
    N = num_states or B
    S = randn(N, H, K, V, seed=seed + 4, scale=0.5)
    state = (S, randn(N, H, K, seed=seed + 5).abs()) if normalize else S
    return q, k, v, g, state


def leaves(tensors, dtype, state_dtype=torch.float32):
    """Fresh leaf copies: q, k, v, g in `dtype`, states in `state_dtype`; None stays None."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif isinstance(t, tuple):
            out.append(tuple(s.detach().to(state_dtype).requires_grad_() for s in t))
        else:
            out.append(t.detach().to(dtype).requires_grad_())
    return out


def rounded(tensors, dtype):
    """The inputs as the kernel sees them (q, k, v, g in `dtype`, states fp32), back in fp64."""
    out = []
    for t in tensors:
        if t is None or isinstance(t, tuple):
            out.append(t if t is None else tuple(s.float().double() for s in t))
        else:
            out.append(t.to(dtype).double())
    return out


def flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def backprop(o, final, seed=7):
    """Random cotangents on o and on every final-state tensor."""
    loss = (o.double() * randn(*o.shape, seed=seed, dtype=torch.float64)).sum()
    for i, s in enumerate(flat(final)):
        loss = loss + (s.double() * randn(*s.shape, seed=seed + 1 + i, dtype=torch.float64)).sum()
    loss.backward()


def grads_of(tensors):
    named = []
    for name, t in zip(["q", "k", "v", "g"], tensors[:4], strict=True):
        if t is not None:
            named.append((f"d{name}", t.grad))
    for i, s in enumerate(flat(tensors[4])):
        named.append((f"dinitial_state[{i}]", s.grad))
    return named


def check_against_reference(B, T, H, K, V, *, use_g, normalize, dtype=torch.float32, seed=0):
    inputs = make_inputs(B, T, H, K, V, seed=seed, use_g=use_g, normalize=normalize)
    scale = 1.0 if normalize else K**-0.5

    kernel = leaves(inputs, dtype)
    o, final = linear_attn(
        *kernel[:3], g=kernel[3], normalize=normalize, initial_state=kernel[4],
        output_final_state=True, backend="triton",
    )  # fmt: skip
    backprop(o, final)

    ref = leaves(rounded(inputs, dtype), torch.float64, state_dtype=torch.float64)
    o_ref, final_ref = linear_attn_quadratic_ref(
        *ref[:3], g=ref[3], scale=scale, normalize=normalize, initial_state=ref[4],
        output_final_state=True,
    )  # fmt: skip
    backprop(o_ref, final_ref)

    ratio = RATIO[dtype]
    assert o.dtype == dtype
    assert_close("o", o_ref, o, ratio)
    for i, (s_ref, s) in enumerate(zip(flat(final_ref), flat(final), strict=True)):
        assert s.dtype == torch.float32
        assert_close(f"final_state[{i}]", s_ref, s, ratio)
    for (name, g_ref), (_, g_out) in zip(grads_of(ref), grads_of(kernel), strict=True):
        assert_close(name, g_ref, g_out, ratio)


CASES = [
    pytest.param(T, H, K, V, use_g, normalize, id=f"T{T}-H{H}-K{K}-V{V}-{'g' if use_g else 'nog'}"
                 f"{'-norm' if normalize else ''}")
    for T in (1, 63, 64, 100, 300)
    for (H, K, V) in ((1, 16, 32), (3, 48, 64))
    for (use_g, normalize) in ((True, False), (False, True))
] + [
    pytest.param(100, 3, 32, 16, True, True, id="T100-H3-K32-V16-g-norm"),
    pytest.param(100, 1, 64, 48, False, False, id="T100-H1-K64-V48-nog"),
]  # fmt: skip


@pytest.mark.parametrize("T,H,K,V,use_g,normalize", CASES)
def test_forward_and_gradients_fp32(T, H, K, V, use_g, normalize):
    check_against_reference(2, T, H, K, V, use_g=use_g, normalize=normalize)


@pytest.mark.parametrize("T", [1, 100])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_forward_and_gradients_fp16(T, normalize):
    check_against_reference(1, T, 2, 32, 32, use_g=True, normalize=normalize, dtype=torch.float16)


@pytest.mark.parametrize("K", [153, 273], ids=["taylor-compressed", "taylor-full"])
def test_based_feature_sizes(K):
    """Feature sizes that are not powers of two are masked within K blocks."""
    check_against_reference(1, 70, 2, K, 16, use_g=False, normalize=True)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_varlen_equals_per_sequence(normalize):
    lengths = [1, 70, 0, 5, 64, 2]
    inputs = make_inputs(
        1, sum(lengths), 2, 16, 24, seed=3, use_g=True, normalize=normalize,
        num_states=len(lengths),
    )  # fmt: skip
    cu = cu_seqlens_from_lengths(lengths)
    packed = leaves(inputs, torch.float32)
    o, final = linear_attn(
        *packed[:3], g=packed[3], normalize=normalize, initial_state=packed[4],
        output_final_state=True, cu_seqlens=cu, backend="triton",
    )  # fmt: skip
    backprop(o, final)

    offsets = cu.tolist()
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        part = [t[:, start:end] for t in inputs[:4]]
        state = inputs[4]
        part.append(tuple(s[n : n + 1] for s in state) if normalize else state[n : n + 1])
        single = leaves(part, torch.float32)
        o_n, final_n = linear_attn(
            *single[:3], g=single[3], normalize=normalize, initial_state=single[4],
            output_final_state=True, backend="triton",
        )  # fmt: skip
        assert_close(f"o[{n}]", o_n, o[:, start:end], 1e-5)
        for s_n, s in zip(flat(final_n), flat(final), strict=True):
            assert_close(f"final[{n}]", s_n, s[n : n + 1], 1e-5)
        if end > start:
            # Same cotangents as the packed run's, restricted to this sequence.
            do = randn(*o.shape, seed=7, dtype=torch.float64)[:, start:end]
            loss = (o_n.double() * do).sum()
            for i, s in enumerate(flat(final_n)):
                full = randn(*flat(final)[i].shape, seed=8 + i, dtype=torch.float64)
                loss = loss + (s.double() * full[n : n + 1]).sum()
            loss.backward()
            for name, t_single, t_packed in zip("qkvg", single[:4], packed[:4], strict=True):
                assert_close(f"d{name}[{n}]", t_single.grad, t_packed.grad[:, start:end], 1e-5)
            for i, (s_single, s_packed) in enumerate(
                zip(flat(single[4]), flat(packed[4]), strict=True)
            ):
                assert_close(f"dinit[{n}][{i}]", s_single.grad, s_packed.grad[n : n + 1], 1e-5)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "norm"])
def test_prefill_then_decode_equals_full(normalize):
    q, k, v, g, state = (
        t if t is None or isinstance(t, tuple) else t.float()
        for t in make_inputs(2, 40, 2, 16, 8, seed=5, use_g=True, normalize=normalize)
    )
    state = tuple(s.float() for s in state) if normalize else state.float()
    o_full, _ = linear_attn(q, k, v, g=g, normalize=normalize, initial_state=state)
    prefill = 29
    o_pre, carry = linear_attn(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], g=g[:, :prefill], normalize=normalize,
        initial_state=state, output_final_state=True, backend="triton",
    )  # fmt: skip
    steps = []
    for t in range(prefill, 40):
        o_t, carry = linear_attn_step(
            q[:, t], k[:, t], v[:, t], carry, g=g[:, t], normalize=normalize, backend="triton"
        )
        steps.append(o_t)
    decoded = torch.cat([o_pre, torch.stack(steps, dim=1)], dim=1)
    assert_close("decoded", o_full, decoded, 1e-5)


def test_recurrent_inference_path_equals_chunked():
    """Short inference inputs run the recurrent kernel; it must agree with the chunked one."""
    q, k, v, g, state = (
        t.float() for t in make_inputs(2, 9, 3, 20, 12, seed=9, use_g=True, normalize=False)
    )
    with torch.no_grad():
        o_rec, s_rec = linear_attn(
            q, k, v, g=g, initial_state=state, output_final_state=True, backend="triton"
        )
    o_chunk, s_chunk = linear_attn(
        q.requires_grad_(), k, v, g=g, initial_state=state, output_final_state=True,
        backend="triton",
    )  # fmt: skip
    assert_close("o", o_chunk, o_rec, 1e-5)
    assert_close("state", s_chunk, s_rec, 1e-5)


def test_strong_decay_stays_finite():
    q, k, v, _, state = make_inputs(1, 300, 2, 16, 16, seed=1, use_g=False, normalize=False)
    g = (-5.0 + 0.5 * randn(1, 300, 2, seed=4, dtype=torch.float64)).clamp(max=0.0)
    kernel = leaves([q, k, v, g, state], torch.float32)
    o, final = linear_attn(
        *kernel[:3], g=kernel[3], initial_state=kernel[4], output_final_state=True,
        backend="triton",
    )  # fmt: skip
    backprop(o, final)
    for name, t in [("o", o), ("final", final)] + grads_of(kernel):
        assert torch.isfinite(t).all(), name
    o_ref, _ = linear_attn_quadratic_ref(q, k, v, g=g, scale=16**-0.5, initial_state=state)
    assert_close("o", o_ref, o, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    inputs = make_inputs(2, 300, 4, 64, 64, seed=2, use_g=True, normalize=False)
    inputs = [t.cuda() for t in inputs]
    o, final = linear_attn(
        *(t.to(dtype) for t in inputs[:3]), g=inputs[3].float(), initial_state=inputs[4].float(),
        output_final_state=True,
    )  # fmt: skip
    o_ref, final_ref = linear_attn_quadratic_ref(
        *(t.to(dtype).double() for t in inputs[:3]), g=inputs[3], scale=64**-0.5,
        initial_state=inputs[4], output_final_state=True,
    )  # fmt: skip
    assert_close("o", o_ref, o, 2e-2)
    assert_close("final", final_ref, final, 2e-2)


@pytest.mark.gpu
def test_cuda_bf16_wide_normalised_features_backward():
    """JRT's shape: Taylor features (K=273, several partial K blocks), normalised, with an
    initial state, in bf16; forward and every gradient against the fp64 reference."""
    q, k, v, _, state = make_inputs(1, 200, 2, 273, 16, seed=5, use_g=False, normalize=True)
    q, k, v = (t.cuda() / 273 for t in (q, k, v))
    state = tuple(s.cuda() for s in state)

    def run(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        init = tuple(s.to(state_dtype) for s in state)
        o, _ = linear_attn(*leaves, normalize=True, initial_state=init, backend=backend)
        backprop(o, ())
        return [o] + [t.grad for t in leaves]

    out = run(torch.bfloat16, "triton")
    ref = run(torch.float64, "torch")
    for name, r, o in zip(("o", "dq", "dk", "dv"), ref, out, strict=True):
        assert_close(name, r, o, 2e-2)


def test_reverse_cumsum_per_sequence_across_blocks():
    """dg's per-sequence suffix sums, summed in blocks of SUFFIX_BLOCK rows then over blocks,
    equal a plain reverse cumsum of each sequence: sequences that start and end inside a
    block, span several, are empty, or end on a block's last row."""
    lengths = [3, 0, 2 * SUFFIX_BLOCK + 5, SUFFIX_BLOCK - 8, 1, SUFFIX_BLOCK]
    cu = cu_seqlens_from_lengths(lengths)
    x = randn(sum(lengths), 3, seed=40)
    pieces = x.double().split(lengths)
    expected = torch.cat([p.flip(0).cumsum(0).flip(0) for p in pieces]).float()
    assert_close("dg", expected, _reverse_cumsum_per_sequence(x, cu), ratio=1e-7)
