"""causal_conv1d / causal_conv1d_update: reference forms, Triton kernels, varlen, decode, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memzoo.kernels import BackendUnavailableError, causal_conv1d, causal_conv1d_update
from memzoo.kernels.conv1d.reference import (
    conv1d_dense_ref,
    conv1d_recurrent_ref,
    conv1d_ref,
    conv1d_shift_ref,
)
from memzoo.kernels.testing import (
    assert_close,
    bad_cu_seqlens_values,
    cu_seqlens_from_lengths,
    randn,
)

# Relative-RMSE budgets against an fp64 reference.
RATIO = {torch.float32: 1e-5, torch.float16: 2e-3}


def make_inputs(B, T, D, W, *, seed, dtype=torch.float64, num_states=None):
    """x, weight, bias, initial_state in fp64 (cast per test)."""
    return (
        randn(B, T, D, seed=seed, dtype=dtype),
        randn(D, W, seed=seed + 1, dtype=dtype, scale=0.5),
        randn(D, seed=seed + 2, dtype=dtype),
        randn(num_states or B, D, W - 1, seed=seed + 3, dtype=dtype),
    )


def run_with_grads(fn, inputs, dtype):
    """Run fn on leaf copies of inputs in `dtype`; return outputs and input grads (fp64)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    y, final = fn(*leaves)
    # Random cotangents reach every output element; the final state gets its own.
    loss = (y.double() * randn(*y.shape, seed=99, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * randn(*final.shape, seed=98, dtype=torch.float64)).sum()
    loss.backward()
    grads = [None if t is None else t.grad.double() for t in leaves]
    return y, final, grads


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("T", [1, 2, 63])
@pytest.mark.parametrize("W", [2, 3, 4, 8])
def test_reference_forms_agree(W, T, activation):
    x, w, b, s = make_inputs(2, T, 5, W, seed=W * 100 + T)
    y, final = conv1d_ref(x, w, b, activation, s, True)
    y_shift, final_shift = conv1d_shift_ref(x, w, b, activation, s, True)
    y_rec, final_rec = conv1d_recurrent_ref(x, w, b, activation, s)
    y_dense, final_dense = conv1d_dense_ref(x, w, b, activation, s, True)
    assert_close("y dense", y, y_dense, 1e-12)
    assert_close("final dense", final, final_dense, 1e-12)
    assert_close("y shift", y, y_shift, 1e-12)
    assert_close("final shift", final, final_shift, 1e-12)
    assert_close("y recurrent", y, y_rec, 1e-12)
    assert_close("final recurrent", final, final_rec, 1e-12)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(("use_bias", "use_state"), [(True, True), (False, False)])
@pytest.mark.parametrize("W", [1, 2, 4])
def test_dense_form_gradcheck(W, use_bias, use_state, activation):
    """The dense form's own backward against finite differences, T shorter and longer than W."""
    for T in (2, 9):
        x, w, b, s = make_inputs(2, T, 3, W, seed=T + 10 * W)
        args = [x, w, b if use_bias else None, s if use_state else None]
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in args]

        def run(x, w, b, s):
            return conv1d_dense_ref(x, w, b, activation, s, True)

        assert torch.autograd.gradcheck(run, leaves)


@pytest.mark.parametrize("requires_grad", ["all", "x only", "weights only"])
def test_dense_form_gradients_equal_f_conv1d(requires_grad):
    """fp32 gradients of the dense form (the CPU training path) against autograd through
    F.conv1d, also when only some inputs want a gradient."""
    inputs = make_inputs(3, 63, 7, 4, seed=21)
    wanted = {"all": [0, 1, 2, 3], "x only": [0], "weights only": [1, 2]}[requires_grad]
    results = {}
    for name, fn in (("F.conv1d", conv1d_ref), ("dense", conv1d_dense_ref)):
        leaves = [t.detach().float().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
        y, final = fn(*leaves[:3], "silu", leaves[3], True)
        loss = (y * randn(*y.shape, seed=99)).sum() + (final * randn(*final.shape, seed=98)).sum()
        loss.backward()
        results[name] = [t.grad for t in leaves]
    for i, (ref, out) in enumerate(zip(results["F.conv1d"], results["dense"], strict=True)):
        if i in wanted:
            assert_close(f"grad {i}", ref.double(), out.double(), 1e-6)
        else:
            assert out is None


def test_dense_form_double_backward_is_refused():
    x, w, b, s = (t.requires_grad_() for t in make_inputs(1, 6, 2, 3, seed=4))
    y, _ = conv1d_dense_ref(x, w, b, "silu", s)
    cotangent = torch.ones_like(y, requires_grad=True)
    (dx,) = torch.autograd.grad(y, x, cotangent, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dx.sum().backward()


def test_dense_form_keeps_dtypes():
    x, w, b, s = make_inputs(1, 5, 4, 3, seed=2)
    y, final = conv1d_dense_ref(x.half(), w.half(), b.half(), "silu", s.half(), True)
    assert y.dtype == torch.float16 and final.dtype == torch.float32
    assert final.is_contiguous()
    y_ref, final_ref = conv1d_ref(x, w, b, "silu", s, True)
    assert_close("y", y_ref, y.double(), 2e-3)
    assert_close("final", final_ref, final.double(), 2e-3)


def test_reference_matches_nn_conv1d():
    x, w, b, _ = make_inputs(2, 17, 6, 4, seed=5)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(1))
        conv.bias.copy_(b)
    expected = conv(x.transpose(1, 2))[..., :17].transpose(1, 2)
    assert_close("y", expected, causal_conv1d(x, w, b)[0], 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("T", [1, 3, 63, 64, 257])
def test_triton_matches_reference(T, W, dtype):
    # D = 72 is not a multiple of the 64-channel block, so the last block is partial.
    inputs = make_inputs(2, T, 72, W, seed=T * 10 + W)

    def triton_fn(x, w, b, s):
        return causal_conv1d(
            x,
            w,
            b,
            activation="silu",
            initial_state=s,
            output_final_state=True,
            backend="triton",
        )

    def ref_fn(x, w, b, s):
        return conv1d_ref(x, w, b, "silu", s, True)

    y, final, grads = run_with_grads(triton_fn, inputs, dtype)
    y_ref, final_ref, grads_ref = run_with_grads(
        ref_fn, [t.to(dtype) for t in inputs], torch.float64
    )
    assert y.dtype == dtype and final.dtype == torch.float32
    ratio = RATIO[dtype]
    assert_close("y", y_ref, y, ratio)
    assert_close("final_state", final_ref, final, ratio)
    for name, ref, out in zip(
        ["dx", "dweight", "dbias", "dinitial_state"], grads_ref, grads, strict=True
    ):
        assert_close(name, ref, out, ratio)


@pytest.mark.parametrize(
    "use_bias,use_state,activation",
    [(False, False, None), (True, False, None), (False, True, "silu"), (False, False, "swish")],
    ids=["plain", "bias", "state-silu", "swish"],
)
def test_triton_options(use_bias, use_state, activation):
    x, w, b, s = make_inputs(3, 40, 33, 4, seed=7)
    inputs = [x, w, b if use_bias else None, s if use_state else None]

    def call(backend):
        def fn(x, w, b, s):
            return causal_conv1d(x, w, b, activation=activation, initial_state=s, backend=backend)

        return fn

    y, _, grads = run_with_grads(call("triton"), inputs, torch.float32)
    y_ref, _, grads_ref = run_with_grads(call("torch"), inputs, torch.float64)
    assert_close("y", y_ref, y, 1e-5)
    for ref, out in zip(grads_ref, grads, strict=True):
        assert (ref is None) == (out is None)
        if ref is not None:
            assert_close("grad", ref, out, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_equals_per_sequence(backend):
    # Lengths below W - 1, an empty sequence, and sequences that straddle kernel row blocks.
    lengths = [1, 5, 0, 70, 2, 63]
    W, D = 4, 24
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, w, b, s = make_inputs(1, sum(lengths), D, W, seed=11, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)

    def packed(x, w, b, s):
        return causal_conv1d(
            x,
            w,
            b,
            activation="silu",
            initial_state=s,
            output_final_state=True,
            cu_seqlens=cu,
            backend=backend,
        )

    y, final, grads = run_with_grads(packed, [x, w, b, s], dtype)

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
    ys, finals = [], []
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        y_n, final_n = conv1d_ref(
            leaves[0][:, start:end], leaves[1], leaves[2], "silu", leaves[3][n : n + 1], True
        )
        ys.append(y_n)
        finals.append(final_n)
    y_ref, final_ref = torch.cat(ys, dim=1), torch.cat(finals)
    loss = (y_ref * randn(*y_ref.shape, seed=99, dtype=torch.float64)).sum()
    loss = loss + (final_ref * randn(*final_ref.shape, seed=98, dtype=torch.float64)).sum()
    loss.backward()

    ratio = 1e-12 if backend == "torch" else 1e-5
    assert_close("y", y_ref, y, ratio)
    assert_close("final_state", final_ref, final, ratio)
    # The empty sequence hands its initial state straight through.
    assert_close("empty sequence state", s[2], final[2], ratio)
    for name, leaf, out in zip(
        ["dx", "dweight", "dbias", "dinitial_state"], leaves, grads, strict=True
    ):
        assert_close(name, leaf.grad, out, ratio)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    W=st.integers(2, 8),
    D=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_varlen_torch_path_property(lengths, W, D, seed):
    """Any packing of any lengths (empty ones too) equals the sequences run one by one."""
    total = sum(lengths)
    x, w, b, s = make_inputs(1, total, D, W, seed=seed, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    y, final = causal_conv1d(x, w, b, initial_state=s, output_final_state=True, cu_seqlens=cu)
    offsets = cu.tolist()
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        y_n, final_n = conv1d_ref(x[:, start:end], w, b, None, s[n : n + 1], True)
        assert_close(f"y[{n}]", y_n, y[:, start:end], 1e-12)
        assert_close(f"final[{n}]", final_n, final[n : n + 1], 1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("W", [2, 4])
def test_prefill_then_decode_equals_full(W, backend):
    x, w, b, s = (t.float() for t in make_inputs(2, 20, 24, W, seed=W))
    y_full, _ = causal_conv1d(x, w, b, activation="silu", initial_state=s)
    prefill = 7
    y_pre, state = causal_conv1d(
        x[:, :prefill],
        w,
        b,
        activation="silu",
        initial_state=s,
        output_final_state=True,
        backend=backend,
    )
    steps = []
    for t in range(prefill, 20):
        y_t, state = causal_conv1d_update(x[:, t], state, w, b, activation="silu", backend=backend)
        steps.append(y_t)
    assert state.dtype == torch.float32
    assert_close("decoded", y_full, torch.cat([y_pre, torch.stack(steps, dim=1)], dim=1), 1e-6)
    _, final_full = causal_conv1d(x, w, b, initial_state=s, output_final_state=True)
    assert_close("state after decode", final_full, state, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_update_triton_matches_reference(dtype):
    x, w, b, s = make_inputs(3, 1, 150, 4, seed=3)
    x = x[:, 0].to(dtype)
    y, state = causal_conv1d_update(
        x, s.float(), w.float(), b.float(), activation="silu", backend="triton"
    )
    y_ref, state_ref = causal_conv1d_update(x.double(), s, w, b, activation="silu")
    assert y.dtype == dtype
    assert_close("y", y_ref, y, RATIO[dtype])
    assert_close("state", state_ref, state, 1e-6)


def test_noncontiguous_inputs_are_accepted():
    x, w, b, _ = make_inputs(2, 9, 6, 3, seed=1)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_strided.is_contiguous()
    assert_close("y", causal_conv1d(x, w, b)[0], causal_conv1d(x_strided, w, b)[0], 1e-15)
    assert_close(
        "y triton",
        causal_conv1d(x.float(), w.float(), b.float())[0],
        causal_conv1d(x_strided.float(), w.float(), b.float(), backend="triton")[0],
        1e-6,
    )


@pytest.mark.cpu
def test_auto_backend_on_cpu_uses_torch(monkeypatch):
    import memzoo.kernels.conv1d as conv1d

    calls = []
    monkeypatch.setattr(conv1d, "conv1d_dense_ref", lambda *a: calls.append("ref") or (a[0], None))
    causal_conv1d(torch.zeros(1, 4, 2), torch.zeros(2, 3))
    assert calls == ["ref"]


# ---- bad input -------------------------------------------------------------------------


def _good():
    return torch.zeros(1, 8, 4), torch.zeros(4, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"weight": torch.zeros(4, 1)}, ValueError, "width W must be in 2..8"),
        ({"weight": torch.zeros(4, 9)}, ValueError, "width W must be in 2..8"),
        ({"weight": torch.zeros(5, 3)}, ValueError, r"weight must have shape \[D=4, W\]"),
        ({"x": torch.zeros(8, 4)}, ValueError, r"x must have 3 dims \[B, T, D\]"),
        ({"x": torch.zeros(1, 8, 4, dtype=torch.int64)}, TypeError, "x must be a floating"),
        ({"x": [[0.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"bias": torch.zeros(3)}, ValueError, r"bias must have shape \[D=4\]"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"initial_state": torch.zeros(1, 4, 3)}, ValueError, r"S=2 = W - 1 from weight"),
        ({"initial_state": torch.zeros(2, 4, 2)}, ValueError, "N=1 the number of sequences"),
        (
            {"weight": torch.zeros(4, 3, device="meta")},
            ValueError,
            "weight is on meta but x is on",
        ),
        ({"cu_seqlens": torch.tensor([0, 8])}, TypeError, "cu_seqlens must have dtype int32"),
        ({"cu_seqlens": [0, 8]}, TypeError, "cu_seqlens must be an int32 torch.Tensor"),
        *bad_cu_seqlens_values(8),
        ({"cu_seqlens": torch.tensor([[0, 8]], dtype=torch.int32)}, ValueError, "1-D"),
        (
            {"x": torch.zeros(2, 4, 4), "cu_seqlens": torch.tensor([0, 4], dtype=torch.int32)},
            ValueError,
            "batch size must be 1",
        ),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
        pytest.param(
            {"backend": "cuda"},
            BackendUnavailableError,
            "needs CUDA tensors",
            marks=pytest.mark.cpu,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    x, weight = _good()
    args = {"x": x, "weight": weight, **kwargs}
    with pytest.raises(error, match=match):
        causal_conv1d(args.pop("x"), args.pop("weight"), **args)


def test_update_bad_state_shape():
    with pytest.raises(ValueError, match=r"conv_state must have shape \[B=2, D=4, S=2\]"):
        causal_conv1d_update(torch.zeros(2, 4), torch.zeros(2, 4, 3), torch.zeros(4, 3))


@pytest.mark.cpu
def test_triton_backend_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        causal_conv1d(*_good(), backend="triton")


@pytest.mark.cpu
def test_triton_backend_refuses_float64():
    with pytest.raises(BackendUnavailableError, match="got torch.float64"):
        causal_conv1d(
            torch.zeros(1, 4, 2, dtype=torch.float64), torch.zeros(2, 3), backend="triton"
        )


# ---- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(dtype):
    lengths = [3, 100, 1, 300]
    inputs = [t.cuda() for t in make_inputs(1, sum(lengths), 130, 4, seed=2, num_states=4)]
    cu = cu_seqlens_from_lengths(lengths, device="cuda")

    def fn(backend):
        def run(x, w, b, s):
            return causal_conv1d(
                x,
                w,
                b,
                activation="silu",
                initial_state=s,
                output_final_state=True,
                cu_seqlens=cu,
                backend=backend,
            )

        return run

    y, final, grads = run_with_grads(fn("auto"), inputs, dtype)
    y_ref, final_ref, grads_ref = run_with_grads(
        fn("torch"), [t.to(dtype) for t in inputs], torch.float64
    )
    ratio = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("y", y_ref, y, ratio)
    assert_close("final_state", final_ref, final, ratio)
    for ref, out in zip(grads_ref, grads, strict=True):
        assert_close("grad", ref, out, ratio)
