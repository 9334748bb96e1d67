"""SSD (Mamba-2) through linear attention against the quadratic segment-sum form of the paper."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.ssd import ssd, ssd_step
from memzoo.kernels.ssd.reference import ssd_quadratic_ref
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(Bsz, T, H, G, P, N, *, seed, z=True, D=True, dt_bias=True, num_states=None):
    """fp64 inputs by name, None for the options left out. A ~ -0.4 per head, dt ~ 0.7."""
    inputs = {
        "x": randn(Bsz, T, H, P, seed=seed),
        "dt": randn(Bsz, T, H, seed=seed + 1, scale=0.5),
        "A": -torch.exp(randn(H, seed=seed + 2, scale=0.5) - 1.0),
        "B": randn(Bsz, T, G, N, seed=seed + 3),
        "C": randn(Bsz, T, G, N, seed=seed + 4),
        "D": randn(H, seed=seed + 5) if D else None,
        "z": randn(Bsz, T, H, P, seed=seed + 6) if z else None,
        "dt_bias": randn(H, seed=seed + 7, scale=0.5) if dt_bias else None,
        "initial_state": randn(num_states or Bsz, H, P, N, seed=seed + 8, scale=0.5),
    }
    return {name: None if t is None else t.double() for name, t in inputs.items()}


def leaves(inputs, dtype):
    """Fresh leaf copies in `dtype` (the state in fp32 unless dtype is fp64)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        name: None
        if t is None
        else t.detach().to(state_dtype if name == "initial_state" else dtype).requires_grad_()
        for name, t in inputs.items()
    }


def rounded(inputs, dtype):
    """The inputs as a `dtype` run sees them, back in fp64."""
    return {name: None if t is None else t.to(dtype).double() for name, t in inputs.items()}


def call(fn, inputs, **kwargs):
    args = {name: t for name, t in inputs.items() if name not in ("x", "dt", "A", "B", "C")}
    return fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], **args, **kwargs)


def backprop(y, final, seed=11):
    """Random cotangents on y and the final state."""
    loss = (y.double() * randn(*y.shape, seed=seed, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * randn(*final.shape, seed=seed + 1)).sum()
    loss.backward()


def check_against_reference(inputs, dtype, backend, ratio):
    ours = leaves(inputs, dtype)
    y, final = call(ssd, ours, output_final_state=True, backend=backend)
    backprop(y, final)

    ref = leaves(rounded(inputs, dtype), torch.float64)
    y_ref, final_ref = call(ssd_quadratic_ref, ref, output_final_state=True)
    backprop(y_ref, final_ref)

    assert y.dtype == dtype
    assert final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("y", y_ref, y, ratio)
    assert_close("final_state", final_ref, final, ratio)
    for name in NAMES:
        if ours[name] is not None:
            assert_close(f"d{name}", ref[name].grad, ours[name].grad, ratio)


CASES = [
    pytest.param(T, G, options, id=f"T{T}-G{G}-{'-'.join(options) or 'plain'}")
    for T in (1, 63, 100)
    for G in (1, 2)
    for options in (("z", "D", "dt_bias"), ())
]


@pytest.mark.parametrize("T,G,options", CASES)
def test_torch_equals_quadratic_reference_fp64(T, G, options):
    inputs = make_inputs(
        2, T, 4, G, 8, 6, seed=T + G,
        z="z" in options, D="D" in options, dt_bias="dt_bias" in options,
    )  # fmt: skip
    check_against_reference(inputs, torch.float64, "torch", 1e-10)


@pytest.mark.parametrize(
    "backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)]
)
def test_per_channel_skip_D(backend, dtype, tol):
    """D may be `[H, P]`, one skip weight per channel."""
    inputs = make_inputs(1, 40, 4, 2, 8, 6, seed=3)
    inputs["D"] = randn(4, 8, seed=30)
    check_against_reference(inputs, dtype, backend, tol)


@pytest.mark.parametrize(
    "Bsz,T,H,G,P,N",
    [(1, 100, 2, 1, 64, 16), (2, 70, 4, 2, 24, 16), (2, 1, 2, 2, 8, 8)],
    ids=["B1-T100-H2-G1-P64-N16", "B2-T70-H4-G2-P24-N16", "B2-T1-H2-G2-P8-N8"],
)
def test_triton_equals_quadratic_reference_fp32(Bsz, T, H, G, P, N):
    inputs = make_inputs(Bsz, T, H, G, P, N, seed=5)
    check_against_reference(inputs, torch.float32, "triton", 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strong_decay_stays_finite(backend):
    """dt A ~ -100 per token: every decay underflows to 0, nothing overflows."""
    inputs = make_inputs(1, 80, 2, 1, 8, 8, seed=2)
    inputs["dt"] = 20.0 + randn(1, 80, 2, seed=20).abs()
    inputs["A"] = torch.tensor([-5.0, -8.0], dtype=torch.float64)
    ours = leaves(inputs, torch.float32)
    y, final = call(ssd, ours, output_final_state=True, dt_softplus=False, backend=backend)
    backprop(y, final)
    for name, t in [("y", y), ("final", final)] + [(f"d{n}", ours[n].grad) for n in NAMES]:
        assert torch.isfinite(t).all(), name
    y_ref, final_ref = call(
        ssd_quadratic_ref, rounded(inputs, torch.float32), output_final_state=True,
        dt_softplus=False,
    )  # fmt: skip
    assert_close("y", y_ref, y, 1e-4)
    assert_close("final_state", final_ref, final, 1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_equals_per_sequence(backend):
    lengths = [1, 70, 0, 5, 2]
    inputs = make_inputs(1, sum(lengths), 4, 2, 8, 6, seed=4, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    packed = leaves(inputs, torch.float32)
    y, final = call(ssd, packed, output_final_state=True, cu_seqlens=cu, backend=backend)
    backprop(y, final)

    # The same loss, sequence by sequence, on leaves shared by all sequences.
    single = leaves(inputs, torch.float32)
    dy, dfinal = randn(*y.shape, seed=11), randn(*final.shape, seed=12)
    offsets = cu.tolist()
    loss = 0.0
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        part = {
            name: t[:, start:end] if name in ("x", "dt", "B", "C", "z") else t
            for name, t in single.items()
        }
        part["initial_state"] = single["initial_state"][n : n + 1]
        y_n, final_n = call(ssd, part, output_final_state=True, backend=backend)
        assert_close(f"y[{n}]", y_n, y[:, start:end], 1e-5)
        assert_close(f"final_state[{n}]", final_n, final[n : n + 1], 1e-5)
        loss = loss + (y_n.double() * dy[:, start:end]).sum()
        loss = loss + (final_n.double() * dfinal[n : n + 1]).sum()
    loss.backward()
    for name in NAMES:
        assert_close(f"d{name}", single[name].grad, packed[name].grad, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_then_decode_equals_full(backend):
    inputs = {name: t.float() for name, t in make_inputs(2, 40, 4, 2, 8, 6, seed=6).items()}
    y_full, final_full = call(ssd, inputs, output_final_state=True)
    prefill = 29
    head = {
        name: t if name in ("A", "D", "dt_bias", "initial_state") else t[:, :prefill]
        for name, t in inputs.items()
    }
    y_pre, state = call(ssd, head, output_final_state=True, backend=backend)
    steps = []
    for t in range(prefill, 40):
        before = state.clone()
        y_t, new_state = ssd_step(
            inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
            inputs["C"][:, t], state, D=inputs["D"], z=inputs["z"][:, t],
            dt_bias=inputs["dt_bias"], backend=backend,
        )  # fmt: skip
        assert torch.equal(state, before), "ssd_step modified the given state"
        steps.append(y_t)
        state = new_state
    decoded = torch.cat([y_pre, torch.stack(steps, dim=1)], dim=1)
    assert state.shape == final_full.shape == (2, 4, 8, 6)
    assert_close("decoded", y_full, decoded, 1e-5)
    assert_close("final_state", final_full, state, 1e-5)


def selective_scan_loop(x, dt, A, B, C, D, z, dt_bias, initial_state):
    """Mamba-1's token loop with a decay that is one scalar per head: every h[p, n] of head h
    decays by exp(dt A_h), where Mamba-1 would use its own A[p, n]."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    dt = F.softplus(dt + dt_bias)
    B, C = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (B, C))
    A = A[:, None, None].expand(H, P, N)  # Mamba-1's per-channel, per-state decay rates
    h, ys = initial_state.clone(), []
    for t in range(T):
        delta = dt[:, t, :, None, None]  # [B, H, 1, 1]
        h = torch.exp(delta * A) * h + delta * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1) * F.silu(z), h


def test_equals_selective_scan_with_scalar_decay():
    inputs = make_inputs(2, 37, 4, 2, 8, 6, seed=8)
    y_ref, final_ref = selective_scan_loop(*(inputs[name] for name in NAMES))
    y, final = call(ssd, inputs, output_final_state=True, backend="torch")
    assert_close("y", y_ref, y, 1e-10)
    assert_close("final_state", final_ref, final, 1e-10)


def test_step_equals_reference_per_token():
    inputs = make_inputs(3, 1, 4, 1, 8, 6, seed=9)
    y_ref, final_ref = call(ssd_quadratic_ref, inputs, output_final_state=True)
    y, state = ssd_step(
        inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0],
        inputs["C"][:, 0], inputs["initial_state"], D=inputs["D"], z=inputs["z"][:, 0],
        dt_bias=inputs["dt_bias"],
    )  # fmt: skip
    assert_close("y", y_ref[:, 0], y, 1e-10)
    assert_close("state", final_ref, state, 1e-10)


def _good():
    x = torch.zeros(2, 5, 4, 8)
    return {
        "x": x,
        "dt": torch.zeros(2, 5, 4),
        "A": -torch.ones(4),
        "B": torch.zeros(2, 5, 2, 6),
        "C": torch.zeros(2, 5, 2, 6),
    }


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        pytest.param({"A": torch.ones(4)}, ValueError, "A must be negative",
                     marks=pytest.mark.device_assert),
        pytest.param({"A": torch.tensor([-1.0, -1.0, 0.0, -1.0])}, ValueError,
                     "A must be negative", marks=pytest.mark.device_assert),
        ({"A": -torch.ones(3)}, ValueError, r"A must have shape \[H=4\]"),
        ({"A": -torch.ones(4, 1)}, ValueError, "A must have 1 dims"),
        ({"B": torch.zeros(2, 5, 3, 6), "C": torch.zeros(2, 5, 3, 6)}, ValueError,
         "H=4 .* multiple of the number of groups G=3"),
        ({"C": torch.zeros(2, 5, 2, 7)}, ValueError, "C must have shape"),
        ({"dt": torch.zeros(2, 5)}, ValueError, "dt must have 3 dims"),
        ({"x": torch.zeros(2, 5, 4)}, ValueError, "x must have 4 dims"),
        ({"D": torch.zeros(5)}, ValueError, "D must have shape"),
        ({"z": torch.zeros(2, 5, 4, 7)}, ValueError, "z must have shape"),
        ({"dt_bias": torch.zeros(2)}, ValueError, "dt_bias must have shape"),
        ({"initial_state": torch.zeros(2, 4, 6, 8)}, ValueError,
         r"initial_state must have shape \[N_seq=2, H=4, P=8, N=6\] \(mamba-ssm's layout"),
        ({"initial_state": [0.0]}, TypeError, "initial_state must be a torch.Tensor"),
        pytest.param({"dt": -torch.ones(2, 5, 4), "dt_softplus": False}, ValueError,
                     "dt .* must be >= 0", marks=pytest.mark.device_assert),
        ({"A": [-1.0] * 4}, TypeError, "A must be a torch.Tensor"),
    ],
    ids=[
        "A-positive", "A-zero", "A-wrong-H", "A-2d", "H-not-multiple-of-G", "C-wrong-N",
        "dt-2d", "x-3d", "D-wrong-H", "z-wrong-P", "dt_bias-wrong-H", "state-NP-swapped",
        "state-not-tensor", "negative-dt-without-softplus", "A-list",
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(kwargs, error, match):
    args = {**_good(), **kwargs}
    with pytest.raises(error, match=match):
        ssd(*[args.pop(name) for name in ("x", "dt", "A", "B", "C")], **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param({"A": torch.ones(4)}, "A must be negative", marks=pytest.mark.device_assert),
        ({"state": torch.zeros(2, 4, 6, 8)}, r"state must have shape \[B=2, H=4, P=8, N=6\]"),
        ({"B": torch.zeros(2, 3, 6), "C": torch.zeros(2, 3, 6)}, "multiple of the number"),
    ],
    ids=["A-positive", "state-NP-swapped", "H-not-multiple-of-G"],
)
def test_step_bad_input_raises_clear_error(kwargs, match):
    args = {
        "x": torch.zeros(2, 4, 8), "dt": torch.zeros(2, 4), "A": -torch.ones(4),
        "B": torch.zeros(2, 2, 6), "C": torch.zeros(2, 2, 6), "state": torch.zeros(2, 4, 8, 6),
        **kwargs,
    }  # fmt: skip
    with pytest.raises(ValueError, match=match):
        ssd_step(*[args.pop(name) for name in ("x", "dt", "A", "B", "C", "state")], **args)


@pytest.mark.parametrize(
    "H,G,P,N,options,softplus,dtype",
    [(4, 2, 8, 6, "head-D", True, torch.float32), (3, 1, 5, 7, "channel-D", True, torch.float32),
     (2, 2, 16, 4, "none", False, torch.float32), (4, 1, 8, 16, "head-D", True, torch.float16)],
    ids=["H4-G2-P8-N6-fp32", "H3-G1-P5-N7-D[H,P]-fp32", "H2-G2-P16-N4-plain-fp32",
         "H4-G1-P8-N16-fp16"],
)  # fmt: skip
def test_triton_step_equals_torch_step(H, G, P, N, options, softplus, dtype):
    """The one-kernel Triton step against the torch step (linear_attn_step + elementwise) in
    fp64: y and the new state, for a state given in mamba-ssm's contiguous `[B, H, P, N]`
    layout and for the transposed view that a step returns."""
    extras = options != "none"
    inputs = make_inputs(3, 1, H, G, P, N, seed=H + P, z=extras, D=extras, dt_bias=extras)
    if options == "channel-D":
        inputs["D"] = randn(H, P, seed=3)
    if not softplus:
        inputs["dt"] = inputs["dt"].abs()
    per_token = ("x", "dt", "B", "C", "z")
    step = {n: t[:, 0] if n in per_token else t for n, t in inputs.items() if t is not None}
    state = step.pop("initial_state")
    y_ref, state_ref = ssd_step(**step, state=state, dt_softplus=softplus, backend="torch")

    # Activations in `dtype`; parameters, time steps and the state in fp32.
    cast = {n: t.to(dtype) if n in ("x", "B", "C", "z") else t.float() for n, t in step.items()}
    kernel_layout = state.float().transpose(-1, -2).contiguous().transpose(-1, -2)
    ratio = 1e-5 if dtype == torch.float32 else 2e-3
    for layout, given in (("contiguous", state.float()), ("view", kernel_layout)):
        y, new_state = ssd_step(**cast, state=given, dt_softplus=softplus, backend="triton")
        assert y.dtype == dtype and new_state.dtype == torch.float32
        assert new_state.shape == (3, H, P, N)
        assert_close(f"y ({layout})", y_ref, y, ratio)
        assert_close(f"state ({layout})", state_ref, new_state, ratio)
