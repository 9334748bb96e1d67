"""Fused BASED attention (Triton, interpreter) against the unfused Taylor-map linear attention."""

import pytest
import torch

from memzoo.kernels import BackendUnavailableError
from memzoo.kernels.linear_attn import (
    based_attn,
    based_attn_step,
    get_feature_map,
    linear_attn,
    linear_attn_step,
)
from memzoo.kernels.linear_attn.reference import linear_attn_quadratic_ref
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn

D, F = 16, 273
RATIO = {torch.float32: 1e-4, torch.float16: 5e-3}
taylor = get_feature_map("taylor")


def make_inputs(B, T, H, V, *, seed, num_states=None):
    """fp64 q, k, v and an initial state (S, z) as some earlier prefix would leave it."""
    f64 = torch.float64
    q, k = randn(B, T, H, D, seed=seed, dtype=f64), randn(B, T, H, D, seed=seed + 1, dtype=f64)
    v = randn(B, T, H, V, seed=seed + 2, dtype=f64)
    N = num_states or B
    phi = taylor(randn(N, 8, H, D, seed=seed + 3, dtype=f64))
    # The state a real 8-token prefix leaves: phi(q)·z > 0, as it always is in BASED.
    S = torch.einsum("nthf,nthv->nhfv", phi, randn(N, 8, H, V, seed=seed + 4, dtype=f64))
    return q, k, v, (S, phi.sum(1))


def leaves(tensors, dtype):
    """Fresh leaf copies: q, k, v in `dtype`, the state pair in fp32; None stays None."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif isinstance(t, tuple):
            out.append(tuple(s.detach().float().requires_grad_() for s in t))
        else:
            out.append(t.detach().to(dtype).requires_grad_())
    return out


def unfused(q, k, v, state, **kwargs):
    """The oracle: taylor features materialised, then quadratic normalised linear attention."""
    return linear_attn_quadratic_ref(
        taylor(q), taylor(k), v, scale=1.0, normalize=True, initial_state=state, **kwargs
    )


def backprop(o, final, seed=7):
    """Random cotangents on o and on both final-state tensors."""

    def cotangent(t, offset):
        return randn(*t.shape, seed=seed + offset, dtype=torch.float64, device=t.device)

    loss = (o.double() * cotangent(o, 0)).sum()
    for i, s in enumerate(final):
        loss = loss + (s.double() * cotangent(s, 1 + i)).sum()
    loss.backward()


def grads_of(q, k, v, state):
    named = [("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]
    if state is not None:
        named += [("dinitial_state.S", state[0].grad), ("dinitial_state.z", state[1].grad)]
    return named


def check_against_unfused(B, T, H, V, *, dtype=torch.float32, with_state=True, seed=0):
    q, k, v, state = make_inputs(B, T, H, V, seed=seed)
    state = state if with_state else None

    kernel = leaves([q, k, v, state], dtype)
    o, final = based_attn(
        *kernel[:3], initial_state=kernel[3], output_final_state=True, backend="triton"
    )
    backprop(o, final)

    # The reference sees the inputs as the kernel does (rounded to dtype), in fp64.
    ref = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref_state = None if state is None else tuple(s.float().double().requires_grad_() for s in state)
    o_ref, final_ref = unfused(*ref, ref_state, output_final_state=True)
    backprop(o_ref, final_ref)

    ratio = RATIO[dtype]
    assert o.dtype == dtype
    assert_close("o", o_ref, o, ratio)
    for name, s_ref, s in zip(("S", "z"), final_ref, final, strict=True):
        assert s.dtype == torch.float32
        assert_close(f"final_state.{name}", s_ref, s, ratio)
    for (name, g_ref), (_, g) in zip(grads_of(*ref, ref_state), grads_of(*kernel), strict=True):
        assert_close(name, g_ref, g, ratio)


@pytest.mark.parametrize(
    "B,T,H,V,with_state",
    [
        (2, 1, 2, 16, True),
        (2, 63, 1, 24, True),
        (1, 100, 2, 24, True),
        (2, 100, 1, 16, False),
    ],
    ids=["B2-T1-H2-V16", "B2-T63-H1-V24", "B1-T100-H2-V24", "B2-T100-H1-V16-no-state"],
)
def test_forward_and_gradients_fp32(B, T, H, V, with_state):
    check_against_unfused(B, T, H, V, with_state=with_state)


def test_forward_and_gradients_fp16():
    check_against_unfused(1, 100, 1, 16, dtype=torch.float16, seed=1)


def test_torch_backend_is_the_unfused_path():
    q, k, v, state = (
        t if isinstance(t, tuple) else t.float() for t in make_inputs(2, 70, 2, 8, seed=2)
    )
    state = tuple(s.float() for s in state)
    o, final = based_attn(q, k, v, initial_state=state, output_final_state=True, backend="torch")
    o_ref, final_ref = linear_attn(
        taylor(q), taylor(k), v, normalize=True, initial_state=state, output_final_state=True,
        backend="torch",
    )  # fmt: skip
    assert_close("o", o_ref, o, 1e-6)
    for s_ref, s in zip(final_ref, final, strict=True):
        assert_close("final_state", s_ref, s, 1e-6)


def test_varlen_equals_per_sequence():
    lengths = [1, 70, 0, 5, 64]
    q, k, v, state = make_inputs(1, sum(lengths), 1, 16, seed=3, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    packed = leaves([q, k, v, state], torch.float32)
    o, final = based_attn(
        *packed[:3], initial_state=packed[3], output_final_state=True, cu_seqlens=cu,
        backend="triton",
    )  # fmt: skip
    backprop(o, final)

    offsets = cu.tolist()
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        single = [t[:, start:end].requires_grad_() for t in (q, k, v)]
        single_state = tuple(s[n : n + 1].requires_grad_() for s in state)
        o_n, final_n = unfused(*single, single_state, output_final_state=True)
        assert_close(f"o[{n}]", o_n, o[:, start:end], 1e-4)
        for s_n, s in zip(final_n, final, strict=True):
            assert_close(f"final[{n}]", s_n, s[n : n + 1], 1e-4)
        # The packed run's cotangents, restricted to this sequence.
        loss = (o_n * randn(*o.shape, seed=7, dtype=torch.float64)[:, start:end]).sum()
        for i, s in enumerate(final_n):
            full = randn(*final[i].shape, seed=8 + i, dtype=torch.float64)
            loss = loss + (s * full[n : n + 1]).sum()
        loss.backward()
        for name, t_single, t_packed in zip("qkv", single, packed[:3], strict=True):
            if end > start:
                assert_close(f"d{name}[{n}]", t_single.grad, t_packed.grad[:, start:end], 1e-4)
        for name, s_single, s_packed in zip(("S", "z"), single_state, packed[3], strict=True):
            assert_close(
                f"dinitial_state.{name}[{n}]", s_single.grad, s_packed.grad[n : n + 1], 1e-4
            )


def test_prefill_then_decode_equals_full():
    q, k, v, state = make_inputs(2, 40, 2, 8, seed=5)
    q, k, v = q.float(), k.float(), v.float()
    state = tuple(s.float() for s in state)
    o_full, _ = unfused(q, k, v, state)
    prefill = 29
    o_pre, carry = based_attn(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], initial_state=state,
        output_final_state=True, backend="triton",
    )  # fmt: skip
    steps = []
    for t in range(prefill, 40):
        o_t, carry = based_attn_step(q[:, t], k[:, t], v[:, t], carry, backend="triton")
        steps.append(o_t)
    decoded = torch.cat([o_pre, torch.stack(steps, dim=1)], dim=1)
    assert_close("decoded", o_full, decoded, 1e-5)


def test_state_continues_with_linear_attn_on_taylor_features():
    """The fused kernel's state is linear_attn's state in the taylor map's feature space."""
    q, k, v, state = (
        t if isinstance(t, tuple) else t.float() for t in make_inputs(1, 33, 2, 8, seed=6)
    )
    state = tuple(s.float() for s in state)
    o, carry = based_attn(q, k, v, initial_state=state, output_final_state=True, backend="triton")
    o_ref, carry_ref = linear_attn(
        taylor(q), taylor(k), v, normalize=True, initial_state=state, output_final_state=True
    )
    assert_close("o", o_ref, o, 1e-5)
    with torch.no_grad():
        o_inference, none = based_attn(q, k, v, initial_state=state, backend="triton")
    assert none is None
    assert_close("o without the final state", o_ref, o_inference, 1e-5)
    for name, s_ref, s in zip(("S", "z"), carry_ref, carry, strict=True):
        assert_close(name, s_ref, s, 1e-5)
    q1, k1, v1 = randn(1, 2, D, seed=9), randn(1, 2, D, seed=10), randn(1, 2, 8, seed=11)
    o_step, _ = based_attn_step(q1, k1, v1, carry, backend="torch")
    o_ref, _ = linear_attn_step(taylor(q1), taylor(k1), v1, carry, normalize=True)
    assert_close("o_step", o_ref, o_step, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_matches_one_token_forward(backend):
    q, k, v, state = make_inputs(2, 1, 3, 12, seed=12)
    q, k, v = q.float(), k.float(), v.float()
    state = tuple(s.float() for s in state)
    o, new_state = based_attn_step(q[:, 0], k[:, 0], v[:, 0], state, backend=backend)
    o_ref, state_ref = unfused(q, k, v, state, output_final_state=True)
    assert_close("o", o_ref[:, 0], o, 1e-5)
    for s_ref, s in zip(state_ref, new_state, strict=True):
        assert s.dtype == torch.float32
        assert_close("state", s_ref, s, 1e-5)


def test_bad_feature_dim_is_a_clear_error():
    q = k = torch.zeros(1, 4, 2, 8)
    v = torch.zeros(1, 4, 2, 8)
    with pytest.raises(
        ValueError, match=r"based_attn: q and k must have feature dim D=16.*\(1, 4, 2, 8\)"
    ):
        based_attn(q, k, v)
    with pytest.raises(ValueError, match=r"based_attn_step: q and k must have feature dim D=16"):
        based_attn_step(q[:, 0], k[:, 0], v[:, 0], (torch.zeros(1, 2, F, 8), torch.zeros(1, 2, F)))


def test_mismatched_shapes_raise():
    q = torch.zeros(1, 4, 2, D)
    with pytest.raises(ValueError, match=r"based_attn: k must have shape \[B=1, T=4, H=2, D=16\]"):
        based_attn(q, torch.zeros(1, 5, 2, D), torch.zeros(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"based_attn: v must have shape \[B=1, T=4, H=2, V\]"):
        based_attn(q, q, torch.zeros(1, 4, 3, 8))
    compressed = (torch.zeros(1, 2, 153, 8), torch.zeros(1, 2, 153))
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape.*F=273"):
        based_attn(q, q, torch.zeros(1, 4, 2, 8), initial_state=compressed)
    with pytest.raises(TypeError, match=r"initial_state must be the pair \(S"):
        based_attn(q, q, torch.zeros(1, 4, 2, 8), initial_state=torch.zeros(1, 2, F, 8))
    with pytest.raises(BackendUnavailableError, match="float16, bfloat16 and float32"):
        based_attn(q.double(), q.double(), torch.zeros(1, 4, 2, 8).double(), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    q, k, v, state = make_inputs(2, 300, 4, 64, seed=13)
    q, k, v = (t.cuda().to(dtype).requires_grad_() for t in (q, k, v))
    state = tuple(s.cuda().float().requires_grad_() for s in state)
    o, final = based_attn(q, k, v, initial_state=state, output_final_state=True)
    backprop(o, final)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_state = tuple(s.detach().double().requires_grad_() for s in state)
    o_ref, final_ref = unfused(*ref, ref_state, output_final_state=True)
    backprop(o_ref, final_ref)
    assert_close("o", o_ref, o, 2e-2)
    for name, s_ref, s in zip(("S", "z"), final_ref, final, strict=True):
        assert_close(f"final_state.{name}", s_ref, s, 2e-2)
    for (name, g_ref), (_, g) in zip(
        grads_of(*ref, ref_state), grads_of(q, k, v, state), strict=True
    ):
        assert_close(name, g_ref, g, 2e-2)
