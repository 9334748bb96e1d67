"""linear_attn reference forms (quadratic, recurrent, chunked), varlen, stability, public API."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memzoo.kernels import linear_attn, linear_attn_step
from memzoo.kernels.linear_attn.reference import (
    _default_chunk_size,
    linear_attn_chunk_ref,
    linear_attn_quadratic_ref,
    linear_attn_recurrent_ref,
    linear_attn_step_ref,
)
from memzoo.kernels.testing import (
    assert_close,
    bad_cu_seqlens_values,
    cu_seqlens_from_lengths,
    randn,
)

F64 = 1e-10  # relative RMSE between two fp64 forms
FORMS = {
    "quadratic": linear_attn_quadratic_ref,
    "recurrent": linear_attn_recurrent_ref,
    "chunk": linear_attn_chunk_ref,
}


def make_inputs(B, T, H, K, V, *, seed, normalize=False, decay=False, N=None, g_mean=None):
    """fp64 q, k, v, g (or None) and an initial state for N (default B) sequences.

    With `normalize` q and k are positive (as after a positive feature map) and so is z, so
    denominators stay away from zero.
    """
    q = randn(B, T, H, K, seed=seed, dtype=torch.float64)
    k = randn(B, T, H, K, seed=seed + 1, dtype=torch.float64)
    if normalize:
        q, k = q.sigmoid(), k.sigmoid()
    v = randn(B, T, H, V, seed=seed + 2, dtype=torch.float64)
    g = None
    if decay:
        noise = randn(B, T, H, seed=seed + 3, dtype=torch.float64)
        g = -noise.abs() * 0.3 if g_mean is None else (g_mean + noise).clamp(max=0.0)
    N = B if N is None else N
    S0 = randn(N, H, K, V, seed=seed + 4, dtype=torch.float64)
    state = (S0, randn(N, H, K, seed=seed + 5, dtype=torch.float64).abs()) if normalize else S0
    return {"q": q, "k": k, "v": v, "g": g, "initial_state": state}


def parts(state):
    """A state as a list of tensors: [S] or [S, z]."""
    if state is None:
        return []
    return list(state) if isinstance(state, tuple) else [state]


def leaves_of(inputs):
    """Detached leaf copies requiring grad, with the state kept as a tensor or pair."""

    def leaf(t):
        return t.detach().clone().requires_grad_()

    out = {
        name: None if t is None else leaf(t)
        for name, t in inputs.items()
        if name != "initial_state"
    }
    state = inputs["initial_state"]
    out["initial_state"] = tuple(map(leaf, state)) if isinstance(state, tuple) else leaf(state)
    return out


def grads_of(leaves):
    named = {name: t for name, t in leaves.items() if name != "initial_state" and t is not None}
    for i, s in enumerate(parts(leaves["initial_state"])):
        named[f"initial_state[{i}]"] = s
    return {name: t.grad for name, t in named.items()}


def backward_random(o, final):
    """Backpropagate fixed random cotangents from o and every piece of the final state."""
    loss = (o * randn(*o.shape, seed=99, dtype=o.dtype)).sum()
    for i, s in enumerate(parts(final)):
        loss = loss + (s * randn(*s.shape, seed=98 - i, dtype=s.dtype)).sum()
    loss.backward()


def assert_states_close(name, ref, out, ratio):
    ref_parts, out_parts = parts(ref), parts(out)
    assert len(ref_parts) == len(out_parts), f"{name}: state kinds differ"
    for i, (r, o) in enumerate(zip(ref_parts, out_parts, strict=True)):
        assert_close(f"{name}[{i}]", r, o, ratio)


# ---- the three forms agree ---------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("decay", [False, True], ids=["no-g", "g"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize(
    "T,H",
    [pytest.param(T, H, id=f"B2-T{T}-H{H}-K8-V12") for T in (1, 63, 64, 100) for H in (1, 3)],
)
def test_forms_agree(T, H, normalize, decay, with_state):
    inputs = make_inputs(2, T, H, 8, 12, seed=T + H, normalize=normalize, decay=decay)
    if not with_state:
        inputs["initial_state"] = None
    results = {
        name: form(**inputs, scale=0.4, normalize=normalize, output_final_state=True)
        for name, form in FORMS.items()
    }
    o_ref, final_ref = results["quadratic"]
    assert o_ref.shape == (2, T, H, 12)
    for name in ("recurrent", "chunk"):
        o, final = results[name]
        assert_close(f"{name} o", o_ref, o, F64)
        assert_states_close(f"{name} final", final_ref, final, F64)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 128])
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs(2, 100, 2, 6, 5, seed=3, normalize=True, decay=True)
    o_ref, final_ref = linear_attn_quadratic_ref(
        **inputs, scale=1.0, normalize=True, output_final_state=True
    )
    o, final = linear_attn_chunk_ref(
        **inputs, scale=1.0, normalize=True, output_final_state=True, chunk_size=chunk_size
    )
    assert_close("o", o_ref, o, F64)
    assert_states_close("final", final_ref, final, F64)


@pytest.mark.parametrize(
    ("K", "V", "chunk"), [(32, 32, 32), (16, 64, 32), (64, 64, 64), (128, 64, 64), (273, 65, 64)]
)
def test_default_chunk_size_follows_the_state_size(K, V, chunk):
    assert _default_chunk_size(K, V) == chunk


def test_default_chunks_equal_quadratic():
    """Small states take chunks of 32: T = 100 is three full chunks and a ragged one."""
    inputs = make_inputs(2, 100, 2, 8, 8, seed=23, decay=True)
    leaves = {name: leaves_of(inputs) for name in ("quadratic", "chunk")}
    outputs = {
        name: FORMS[name](**leaves[name], scale=0.6, output_final_state=True) for name in leaves
    }
    assert_close("o", outputs["quadratic"][0], outputs["chunk"][0], F64)
    assert_close("final", outputs["quadratic"][1], outputs["chunk"][1], F64)
    for name in leaves:
        backward_random(*outputs[name])
    grads = {name: grads_of(leaves[name]) for name in leaves}
    for key, ref in grads["quadratic"].items():
        assert_close(f"d{key}", ref, grads["chunk"][key], F64)


@pytest.mark.parametrize("name", list(FORMS))
def test_final_state_only_when_asked(name):
    inputs = make_inputs(1, 5, 2, 4, 4, seed=1)
    o, final = FORMS[name](**inputs, scale=0.5)
    assert final is None and o.shape == (1, 5, 2, 4)


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dtypes(name, dtype):
    """o comes back in v's dtype; states are fp32 for any lower-precision input."""
    inputs = make_inputs(1, 9, 2, 4, 3, seed=2, normalize=True, decay=True)
    for key in ("q", "k", "v", "g"):
        inputs[key] = inputs[key].to(dtype)
    o, (S, z) = FORMS[name](**inputs, scale=1.0, normalize=True, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32


# ---- gradients of the chunked form (the CPU training path) ---------------------------------


@pytest.mark.parametrize("decay", [False, True], ids=["no-g", "g"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_chunk_gradients_equal_quadratic(normalize, decay):
    inputs = make_inputs(2, 100, 3, 8, 5, seed=7, normalize=normalize, decay=decay)
    grads = {}
    for name in ("quadratic", "chunk"):
        leaves = leaves_of(inputs)
        backward_random(
            *FORMS[name](**leaves, scale=0.7, normalize=normalize, output_final_state=True)
        )
        grads[name] = grads_of(leaves)
    assert set(grads["chunk"]) == set(grads["quadratic"])
    for key, ref in grads["quadratic"].items():
        assert_close(f"d{key}", ref, grads["chunk"][key], F64)


@pytest.mark.parametrize("decay", [False, True], ids=["no-g", "g"])
@pytest.mark.parametrize("lengths", [None, [4, 0, 7, 1]], ids=["dense", "packed"])
def test_chunk_backward_gradcheck(lengths, decay):
    """The chunked form's own backward against finite differences: ragged chunks of 3, the
    states passed across them, packed sequences leaving the batch at different chunks."""
    B, T, N = (2, 8, 2) if lengths is None else (1, sum(lengths), len(lengths))
    inputs = make_inputs(B, T, 2, 3, 2, seed=17, decay=decay, N=N)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    names = [key for key, t in inputs.items() if t is not None]

    def run(*tensors):
        o, final = linear_attn_chunk_ref(
            **dict(zip(names, tensors, strict=True)),
            scale=0.8,
            output_final_state=True,
            cu_seqlens=cu,
            chunk_size=3,
        )
        return o, final

    leaves = [inputs[key].detach().clone().requires_grad_() for key in names]
    assert torch.autograd.gradcheck(run, leaves)


def test_chunk_double_backward_is_refused():
    """The backward is written out, not traced: a second derivative raises, never comes out
    silently wrong."""
    leaves = leaves_of(make_inputs(1, 10, 1, 2, 2, seed=3, decay=True))
    o, _ = linear_attn_chunk_ref(**leaves, scale=1.0)
    cotangent = torch.ones_like(o, requires_grad=True)
    (dq,) = torch.autograd.grad(o, leaves["q"], cotangent, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dq.sum().backward()


@pytest.mark.parametrize("used", ["output", "final state"])
def test_chunk_gradients_when_one_output_is_unused(used):
    """Autograd hands the backward None for an unused output; it counts as a zero gradient."""
    inputs = make_inputs(2, 70, 2, 4, 3, seed=19, decay=True)
    grads = {}
    for name in ("quadratic", "chunk"):
        leaves = leaves_of(inputs)
        o, final = FORMS[name](**leaves, scale=1.0, output_final_state=True)
        used_part = o if used == "output" else final
        (used_part * randn(*used_part.shape, seed=97, dtype=used_part.dtype)).sum().backward()
        grads[name] = grads_of(leaves)
    for key, ref in grads["quadratic"].items():
        out = grads["chunk"][key]
        if ref is None:  # q does not reach the final state
            assert out is None or not out.any(), f"d{key} should be zero"
        else:
            assert_close(f"d{key}", ref, out, F64)


# ---- packed sequences ------------------------------------------------------------------------

LENGTHS = [1, 37, 0, 64, 5]


def per_sequence(inputs, lengths, normalize, scale):
    """Run every packed sequence alone through the quadratic form; cat outputs, stack states."""
    offsets = cu_seqlens_from_lengths(lengths).tolist()
    state = inputs["initial_state"]
    outputs, finals = [], []
    for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        piece = {
            key: None if t is None else t[:, start:end]
            for key, t in inputs.items()
            if key != "initial_state"
        }
        s_n = tuple(s[n : n + 1] for s in state) if isinstance(state, tuple) else state[n : n + 1]
        o_n, final_n = linear_attn_quadratic_ref(
            **piece, initial_state=s_n, scale=scale, normalize=normalize, output_final_state=True
        )
        outputs.append(o_n)
        finals.append(parts(final_n))
    o = torch.cat(outputs, dim=1)
    final = [torch.cat(pieces) for pieces in zip(*finals, strict=True)]
    return o, tuple(final) if normalize else final[0]


@pytest.mark.parametrize("decay", [False, True], ids=["no-g", "g"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("name", ["chunk", "recurrent"])
def test_varlen_equals_per_sequence(name, normalize, decay):
    cu = cu_seqlens_from_lengths(LENGTHS)
    inputs = make_inputs(
        1, sum(LENGTHS), 2, 6, 7, seed=5, normalize=normalize, decay=decay, N=len(LENGTHS)
    )
    leaves = leaves_of(inputs)
    o, final = FORMS[name](
        **leaves, scale=0.5, normalize=normalize, output_final_state=True, cu_seqlens=cu
    )
    ref_leaves = leaves_of(inputs)
    o_ref, final_ref = per_sequence(ref_leaves, LENGTHS, normalize, 0.5)
    assert_close("o", o_ref, o, F64)
    assert_states_close("final", final_ref, final, F64)
    # The empty sequence hands its initial state straight through.
    for initial, out in zip(parts(inputs["initial_state"]), parts(final), strict=True):
        assert_close("empty sequence", initial[2], out[2], F64)
    if name == "chunk":
        backward_random(o, final)
        backward_random(o_ref, final_ref)
        ref_grads = grads_of(ref_leaves)
        for key, grad in grads_of(leaves).items():
            assert_close(f"d{key}", ref_grads[key], grad, F64)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    chunk_size=st.integers(1, 9),
    decay=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_varlen_chunk_property(lengths, chunk_size, decay, seed):
    """Any packing (empty sequences too) at any chunk size equals the sequences one by one."""
    inputs = make_inputs(1, sum(lengths), 2, 3, 2, seed=seed, decay=decay, N=len(lengths))
    o, final = linear_attn_chunk_ref(
        **inputs,
        scale=1.0,
        output_final_state=True,
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        chunk_size=chunk_size,
    )
    o_ref, final_ref = per_sequence(inputs, lengths, False, 1.0)
    assert_close("o", o_ref, o, F64)
    assert_close("final", final_ref, final, F64)


# ---- strong decay ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("g_mean", [-5.0, -60.0], ids=["g-5", "g-60"])
def test_strong_decay_is_stable(g_mean, normalize):
    """Cumulative log-decays reach -300 * |g| within T = 300; nothing may overflow."""
    inputs = make_inputs(1, 300, 2, 8, 8, seed=11, normalize=normalize, decay=True, g_mean=g_mean)
    o_rec, final_rec = linear_attn_recurrent_ref(
        **inputs, scale=1.0, normalize=normalize, output_final_state=True
    )
    for dtype, ratio in ((torch.float64, F64), (torch.float32, 1e-5)):
        leaves = leaves_of(inputs)
        o, final = linear_attn_chunk_ref(
            **{key: t.to(dtype) for key, t in leaves.items() if key in "qkvg"},
            initial_state=leaves["initial_state"],
            scale=1.0,
            normalize=normalize,
            output_final_state=True,
        )
        assert_close(f"o {dtype}", o_rec, o, ratio)
        assert_states_close(f"final {dtype}", final_rec, final, ratio)
        backward_random(o.double(), tuple(s.double() for s in parts(final)))
        for key, grad in grads_of(leaves).items():
            assert torch.isfinite(grad).all(), f"d{key} is not finite in {dtype}"


def test_strong_decay_gradients_equal_quadratic():
    inputs = make_inputs(1, 300, 2, 4, 4, seed=13, decay=True, g_mean=-5.0)
    grads = {}
    for name in ("quadratic", "chunk"):
        leaves = leaves_of(inputs)
        backward_random(*FORMS[name](**leaves, scale=1.0, output_final_state=True))
        grads[name] = grads_of(leaves)
    for key, ref in grads["quadratic"].items():
        assert torch.isfinite(ref).all()
        assert_close(f"d{key}", ref, grads["chunk"][key], F64)


# ---- decode step -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_step_leaves_the_state_alone(normalize):
    inputs = make_inputs(2, 1, 3, 4, 5, seed=17, normalize=normalize, decay=True)
    state = inputs["initial_state"]
    before = [s.clone() for s in parts(state)]
    _, new = linear_attn_step_ref(
        inputs["q"][:, 0],
        inputs["k"][:, 0],
        inputs["v"][:, 0],
        state,
        g=inputs["g"][:, 0],
        scale=1.0,
        normalize=normalize,
    )
    for old, now, updated in zip(before, parts(state), parts(new), strict=True):
        assert torch.equal(old, now)
        assert updated.data_ptr() != now.data_ptr()


# ---- public API ------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [False, True], ids=["no-g", "g"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_prefill_then_step_equals_full(normalize, decay):
    inputs = make_inputs(2, 20, 3, 6, 5, seed=19, normalize=normalize, decay=decay)
    q, k, v, g = inputs["q"], inputs["k"], inputs["v"], inputs["g"]
    common = {"normalize": normalize, "backend": "torch"}
    o_full, final_full = linear_attn(
        q, k, v, g=g, initial_state=inputs["initial_state"], output_final_state=True, **common
    )
    prefill = 7
    o_pre, state = linear_attn(
        q[:, :prefill],
        k[:, :prefill],
        v[:, :prefill],
        g=None if g is None else g[:, :prefill],
        initial_state=inputs["initial_state"],
        output_final_state=True,
        **common,
    )
    steps = []
    for t in range(prefill, 20):
        o_t, state = linear_attn_step(
            q[:, t], k[:, t], v[:, t], state, g=None if g is None else g[:, t], **common
        )
        steps.append(o_t)
    assert_close("decoded", o_full, torch.cat([o_pre, torch.stack(steps, dim=1)], dim=1), F64)
    assert_states_close("state after decode", final_full, state, F64)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_default_scale(normalize):
    inputs = make_inputs(1, 10, 2, 9, 4, seed=23, normalize=normalize)
    expected_scale = 1.0 if normalize else 9**-0.5
    o, _ = linear_attn(inputs["q"], inputs["k"], inputs["v"], normalize=normalize)
    o_ref, _ = linear_attn_quadratic_ref(
        inputs["q"], inputs["k"], inputs["v"], scale=expected_scale, normalize=normalize
    )
    assert_close("o", o_ref, o, F64)
    q1, k1, v1 = (inputs[key][:, 0] for key in "qkv")
    S = torch.zeros(1, 2, 9, 4, dtype=torch.float64)
    state = (S, torch.zeros(1, 2, 9, dtype=torch.float64)) if normalize else S
    o_step, _ = linear_attn_step(q1, k1, v1, state, normalize=normalize)
    assert_close("o step", o_ref[:, 0], o_step, F64)


@pytest.mark.cpu
def test_auto_backend_on_cpu_uses_the_chunked_reference(monkeypatch):
    # memzoo.kernels.linear_attn is the function (re-exported by memzoo.kernels); fetch the module.
    la = importlib.import_module("memzoo.kernels.linear_attn")

    calls = []

    def fake(q, k, v, **kwargs):
        calls.append("chunk")
        return v, None

    monkeypatch.setattr(la, "linear_attn_chunk_ref", fake)
    linear_attn(torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 3))
    assert calls == ["chunk"]


# ---- bad input ----------------------------------------------------------------------------------


def _good():
    return {
        "q": torch.zeros(1, 8, 2, 4),
        "k": torch.zeros(1, 8, 2, 4),
        "v": torch.zeros(1, 8, 2, 3),
    }


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"k": torch.zeros(1, 8, 2, 5)}, ValueError, r"k must have shape \[B=1, T=8, H=2, K=4\]"),
        ({"v": torch.zeros(1, 7, 2, 3)}, ValueError, r"v must have shape \[B=1, T=8, H=2, V\]"),
        ({"q": torch.zeros(8, 2, 4)}, ValueError, r"q must have 4 dims \[B, T, H, K\]"),
        ({"q": torch.zeros(1, 8, 2, 4, dtype=torch.int64)}, TypeError, "q must be a floating"),
        pytest.param(
            {"g": torch.full((1, 8, 2), 0.5)},
            ValueError,
            "g is a log-decay and must be <= 0",
            marks=pytest.mark.device_assert,
        ),
        ({"g": torch.zeros(1, 8, 3)}, ValueError, r"g must have shape \[B=1, T=8, H=2\]"),
        (
            {"initial_state": torch.zeros(1, 2, 5, 3)},
            ValueError,
            r"initial_state must have shape \[N=1, H=2, K=4, V=3\]",
        ),
        (
            {"initial_state": torch.zeros(1, 2, 4, 6)},
            ValueError,
            r"initial_state must have shape \[N=1, H=2, K=4, V=3\] \(V=3 from v\)",
        ),
        (
            {"initial_state": torch.zeros(2, 2, 4, 3)},
            ValueError,
            "N=1 the number of sequences",
        ),
        (
            {"initial_state": torch.zeros(1, 2, 4, 3), "normalize": True},
            TypeError,
            r"with normalize=True, initial_state must be the pair",
        ),
        (
            {"initial_state": (torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4))},
            TypeError,
            "with normalize=False, initial_state must be one tensor",
        ),
        (
            {
                "initial_state": (torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 3)),
                "normalize": True,
            },
            ValueError,
            r"initial_state\[1\] must have shape \[N=1, H=2, K=4\]",
        ),
        (
            {
                "q": torch.zeros(2, 4, 2, 4),
                "k": torch.zeros(2, 4, 2, 4),
                "v": torch.zeros(2, 4, 2, 3),
                "cu_seqlens": torch.tensor([0, 4], dtype=torch.int32),
            },
            ValueError,
            "batch size must be 1",
        ),
        *bad_cu_seqlens_values(8),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    args = {**_good(), **kwargs}
    with pytest.raises(error, match=match):
        linear_attn(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(
    "state,normalize,error,match",
    [
        (torch.zeros(3, 2, 4, 3), False, ValueError, r"state must have shape \[N=2"),
        (torch.zeros(2, 2, 4, 5), False, ValueError, r"V=3 from v"),
        (torch.zeros(2, 2, 4, 3), True, TypeError, "must be the pair"),
        ((torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4)), False, TypeError, "got a pair"),
    ],
    ids=["wrong-N", "wrong-V", "tensor-with-normalize", "pair-without-normalize"],
)
def test_step_bad_state_raises_clear_error(state, normalize, error, match):
    q = torch.zeros(2, 2, 4)
    with pytest.raises(error, match=match):
        linear_attn_step(q, q, torch.zeros(2, 2, 3), state, normalize=normalize)


@pytest.mark.device_assert
def test_step_positive_g_is_refused():
    q = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="must be <= 0"):
        linear_attn_step(q, q, torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, 3), g=torch.ones(1, 2))
