"""memzoo's attention kernels against flash-linear-attention's own naive references.

fla (the `fla-core` package, a test dependency) is the field's reference implementation of
these recurrences; its `naive` functions are plain torch and run anywhere. They are a second
oracle beside memzoo's references, written by other people: forward, final state and every
gradient, for each backend. fla computes in fp32, so everything here is fp32.

- scalar-gated linear attention and Mamba-2's SSD vs `naive_recurrent_simple_gla`;
- ungated and normalised linear attention vs `naive_recurrent_linear_attn`;
- BASED vs `naive_parallel_based` (fla's kernel 1 + s + s^2 / 2 with s = q.k / sqrt(16) is
  memzoo's Taylor kernel 1 + q.k / 4 + (q.k)^2 / 32);
- softmax attention (causal, sliding window, bidirectional; grouped-query heads) vs
  `naive_parallel_attn`, whose window_size w is memzoo's window: the w latest keys.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    # On import fla warns that its Triton kernels cannot run on a CPU-only machine, and about
    # torch.jit: neither touches its plain-torch references.
    warnings.simplefilter("ignore")
    from fla.ops.attn.naive import naive_parallel_attn
    from fla.ops.based.naive import naive_parallel_based
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

from memzoo.kernels import attention, based_attn, linear_attn, ssd
from memzoo.kernels.testing import assert_close, randn

BACKENDS = ["torch", "triton"]
TOL = 2e-5


def _grads(outputs, inputs, seed):
    """Gradients of a fixed random projection of `outputs` with respect to `inputs`."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (out * torch.randn(out.shape, generator=generator, device="cpu").to(out.device)).sum()
        for out in outputs
    )
    return torch.autograd.grad(loss, inputs)


def _assert_all_close(names, refs, outs):
    for name, ref, out in zip(names, refs, outs, strict=True):
        assert_close(name, ref, out, TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 37, 100])
def test_gated_linear_attn_equals_fla_simple_gla(backend, T):
    B, H, K, V = 2, 3, 16, 8
    q, k, v = randn(B, T, H, K, seed=1), randn(B, T, H, K, seed=2), randn(B, T, H, V, seed=3)
    g = -F.softplus(randn(B, T, H, seed=4))
    h0 = randn(B, H, K, V, seed=5)
    inputs = [t.requires_grad_() for t in (q, k, v, g, h0)]
    ref, ref_state = naive_recurrent_simple_gla(q, k, v, g, initial_state=h0)
    out, state = linear_attn(
        q, k, v, g=g, initial_state=h0, output_final_state=True, backend=backend
    )
    _assert_all_close(["o", "final_state"], [ref, ref_state], [out, state])
    names = ["dq", "dk", "dv", "dg", "dh0"]
    _assert_all_close(names, _grads([ref, ref_state], inputs, 6), _grads([out, state], inputs, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalised"])
def test_linear_attn_equals_fla_linear_attn(backend, normalize):
    B, T, H, K, V = 2, 70, 2, 8, 8
    q, k, v = randn(B, T, H, K, seed=7), randn(B, T, H, K, seed=8), randn(B, T, H, V, seed=9)
    if normalize:  # positive features, as after a positive feature map
        q, k = q.sigmoid(), k.sigmoid()
    inputs = [t.requires_grad_() for t in (q, k, v)]
    scale = K**-0.5
    ref, _ = naive_recurrent_linear_attn(q, k, v, scale=scale, normalize=normalize)
    # fla scales the normaliser too (the scale cancels) and adds 1e-10 to it.
    out, _ = linear_attn(q, k, v, scale=scale, normalize=normalize, eps=1e-10 / scale,
                         backend=backend)  # fmt: skip
    assert_close("o", ref, out, TOL)
    _assert_all_close(["dq", "dk", "dv"], _grads([ref], inputs, 10), _grads([out], inputs, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssd_equals_fla_simple_gla(backend):
    """SSD is simple GLA with q = C, k = B (per group), v = x dt, g = dt A."""
    B, T, H, P, G, N = 2, 50, 4, 8, 2, 16
    x, dt_raw = randn(B, T, H, P, seed=11), randn(B, T, H, seed=12)
    A = -torch.rand(H, generator=torch.Generator().manual_seed(13), device="cpu").to(x.device) - 0.5
    Bm, Cm = randn(B, T, G, N, seed=14), randn(B, T, G, N, seed=15)
    h0 = randn(B, H, P, N, seed=16)  # memzoo's (mamba-ssm's) layout [B, H, P, N]
    inputs = [t.requires_grad_() for t in (x, dt_raw, A, Bm, Cm, h0)]
    dt = F.softplus(dt_raw)
    per_head = H // G
    ref, ref_state = naive_recurrent_simple_gla(
        Cm.repeat_interleave(per_head, dim=2), Bm.repeat_interleave(per_head, dim=2),
        x * dt[..., None], dt * A, scale=1.0, initial_state=h0.transpose(-1, -2),
    )  # fmt: skip
    ref_state = ref_state.transpose(-1, -2)
    out, state = ssd(x, dt_raw, A, Bm, Cm, initial_state=h0, output_final_state=True,
                     backend=backend)  # fmt: skip
    _assert_all_close(["y", "final_state"], [ref, ref_state], [out, state])
    names = ["dx", "ddt", "dA", "dB", "dC", "dh0"]
    _assert_all_close(names, _grads([ref, ref_state], inputs, 17), _grads([out, state], inputs, 17))


@pytest.mark.parametrize("backend", BACKENDS)
def test_based_equals_fla_based(backend):
    B, T, H, V = 2, 45, 2, 8
    q, k, v = randn(B, T, H, 16, seed=18), randn(B, T, H, 16, seed=19), randn(B, T, H, V, seed=20)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    # fla's naive BASED is head-first, [B, H, T, D].
    ref = naive_parallel_based(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out, _ = based_attn(q, k, v, backend=backend)
    assert_close("o", ref, out, TOL)
    _assert_all_close(["dq", "dk", "dv"], _grads([ref], inputs, 21), _grads([out], inputs, 21))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "causal,window", [(True, None), (True, 5), (False, None)], ids=["causal", "window5", "full"]
)
def test_attention_equals_fla_attention(backend, causal, window):
    B, T, H, Hkv, D = 2, 40, 4, 2, 16
    q, k, v = randn(B, T, H, D, seed=22), randn(B, T, Hkv, D, seed=23), randn(B, T, Hkv, D, seed=24)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    ref, _ = naive_parallel_attn(q, k, v, window_size=window, causal=causal)
    out = attention(q, k, v, causal=causal, window=window, backend=backend)
    assert_close("o", ref, out, TOL)
    _assert_all_close(["dq", "dk", "dv"], _grads([ref], inputs, 25), _grads([out], inputs, 25))
