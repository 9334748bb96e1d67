"""selective_scan reference forms (recurrent, chunked), stability, varlen, decode, public API."""

import math
import threading

import pytest
import torch

from memzoo.kernels import selective_scan, selective_state_update
from memzoo.kernels._core import BackendUnavailableError, registered_ops
from memzoo.kernels.selective_scan import reference
from memzoo.kernels.selective_scan.reference import (
    _blocks_per_chunk,
    _borrowed_workspace,
    _ChunkedTokenLoop,
    _default_chunk_size,
    _DenseChunks,
    _foreach_recurrence_,
    _PackedChunks,
    _stepwise_recurrence_,
    release_kept_workspace,
    selective_scan_chunk_ref,
    selective_scan_recurrent_ref,
)
from memzoo.kernels.testing import (
    TEST_DEVICE,
    assert_close,
    bad_cu_seqlens_values,
    cu_seqlens_from_lengths,
    randn,
)

F64 = 1e-10  # relative RMSE between two fp64 forms
ALL = ("D", "z", "delta_bias", "softplus", "initial_state")


def make_inputs(Bsz, T, Dm, N, G, *, seed, options=ALL, num_seqs=None, dtype=torch.float64):
    """Inputs of a Mamba-1 scan and its flags; `options` names the optional parts to include.

    Without softplus, delta is drawn positive (a step size); A is in [-3, -0.1].
    """

    def draw(*shape, offset):
        return randn(*shape, seed=seed + offset, dtype=dtype)

    delta = draw(Bsz, T, Dm, offset=1)
    if "softplus" not in options:
        delta = delta.abs() * 0.5
    inputs = {
        "u": draw(Bsz, T, Dm, offset=0),
        "delta": delta,
        "A": -(draw(Dm, N, offset=2).abs() * 1.5 + 0.1).clamp(max=3.0),
        "B": draw(Bsz, T, G, N, offset=3),
        "C": draw(Bsz, T, G, N, offset=4),
    }
    optional = {
        "D": lambda: draw(Dm, offset=5),
        "z": lambda: draw(Bsz, T, Dm, offset=6),
        "delta_bias": lambda: draw(Dm, offset=7) * 0.5 - 1.0,
        "initial_state": lambda: draw(Bsz if num_seqs is None else num_seqs, Dm, N, offset=8),
    }
    for name, make in optional.items():
        inputs[name] = make() if name in options else None
    return inputs, {"delta_softplus": "softplus" in options}


def leaves_of(inputs):
    return {
        k: None if t is None else t.detach().clone().requires_grad_() for k, t in inputs.items()
    }


def backward_random(y, final):
    """Backpropagate fixed random cotangents from y and the final state."""
    loss = (y * randn(*y.shape, seed=99, dtype=y.dtype)).sum()
    loss = loss + (final * randn(*final.shape, seed=98, dtype=final.dtype)).sum()
    loss.backward()


def forward_and_grads(form, inputs, flags, **kwargs):
    leaves = leaves_of(inputs)
    y, final = form(**leaves, **flags, output_final_state=True, **kwargs)
    backward_random(y, final)
    grads = {name: t.grad for name, t in leaves.items() if t is not None}
    return y.detach(), final.detach(), grads


# ---- the two forms agree, forward and every gradient -------------------------------------

CASES = [
    # (B, T, Dm, N, G, options)
    (2, 1, 20, 4, 1, ALL),
    (2, 63, 36, 16, 2, ALL),
    (1, 100, 20, 4, 2, ()),
    (2, 100, 36, 4, 1, ("z", "softplus")),
    (1, 63, 20, 16, 1, ("D", "delta_bias", "initial_state")),
    (1, 256, 36, 16, 2, ALL),
    (2, 256, 20, 4, 1, ("D", "z", "initial_state")),
]


def case_id(B, T, Dm, N, G, options):
    return f"B{B}-T{T}-D{Dm}-N{N}-G{G}-" + ("+".join(options) or "plain")


@pytest.mark.parametrize("block_size", [8, None], ids=["blocks", "token-loop"])
@pytest.mark.parametrize(
    "Bsz,T,Dm,N,G,options", [pytest.param(*case, id=case_id(*case)) for case in CASES]
)
def test_chunk_equals_recurrent_forward_and_gradients(Bsz, T, Dm, N, G, options, block_size):
    """With autograd: blocks of 8 through autograd op by op, or (None) the token loop with its
    own backward; chunks of 64, so T = 100 and 256 cross several."""
    inputs, flags = make_inputs(Bsz, T, Dm, N, G, seed=T + Dm, options=options)
    y_ref, final_ref, grads_ref = forward_and_grads(selective_scan_recurrent_ref, inputs, flags)
    y, final, grads = forward_and_grads(
        selective_scan_chunk_ref, inputs, flags, chunk_size=64, block_size=block_size
    )
    assert y.shape == (Bsz, T, Dm) and final.shape == (Bsz, Dm, N)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)
    assert set(grads) == {name for name, t in inputs.items() if t is not None}
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], F64)


@pytest.mark.parametrize(
    "chunk_size,block_size", [(1, 1), (7, 3), (16, 16), (64, 8), (100, 7), (256, 16), (512, 64)]
)
def test_chunk_and_block_size_do_not_change_the_result(chunk_size, block_size):
    inputs, flags = make_inputs(2, 100, 20, 4, 2, seed=3)
    y_ref, final_ref = selective_scan_recurrent_ref(**inputs, **flags, output_final_state=True)
    y, final = selective_scan_chunk_ref(
        **inputs, **flags, output_final_state=True, chunk_size=chunk_size, block_size=block_size
    )
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_chunk_inference_path_equals_autograd_path(packed):
    """Without autograd the chunked form reuses one workspace across chunks and scans in place;
    with it, every step is a new tensor. Both give the same result, call after call."""
    lengths = [37, 100, 5] if packed else None
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    Bsz, T = (1, sum(lengths)) if packed else (2, 100)
    inputs, flags = make_inputs(Bsz, T, 20, 4, 2, seed=21, num_seqs=None if cu is None else 3)
    kwargs = {**flags, "output_final_state": True, "cu_seqlens": cu, "chunk_size": 32}
    y_grad, final_grad = selective_scan_chunk_ref(**leaves_of(inputs), **kwargs, block_size=8)
    assert y_grad.requires_grad
    with torch.inference_mode():
        for _ in range(2):
            y, final = selective_scan_chunk_ref(**inputs, **kwargs, block_size=8)
            assert_close("y", y_grad.detach(), y, F64)
            assert_close("final", final_grad.detach(), final, F64)


def test_block_count_rule():
    """The token loop unless a block size is asked for; blocks never longer than the chunk."""
    assert _blocks_per_chunk(64, None) == 1
    assert _blocks_per_chunk(64, 16) == 4
    assert _blocks_per_chunk(100, 7) == 15
    assert _blocks_per_chunk(8, 64) == 1


def test_default_chunk_size_rule():
    """Chunks of up to 256 tokens, 2^k or 3 * 2^(k-1) of them (at least 8), each buffer within
    3 MiB for the forward alone and 2 MiB with autograd; fp64 states count double."""
    forward = {80: 256, 64 * 16: 256, 256 * 16: 192, 512 * 16: 96, 3 * 512 * 16: 32}
    forward |= {16 * 256 * 16: 12, 1024 * 1024 * 16: 8}
    for width, tokens in forward.items():
        assert _default_chunk_size(width, 4, autograd=False) == tokens, width
    assert _default_chunk_size(512 * 16, 8, autograd=False) == 48
    autograd = {80: 256, 256 * 16: 128, 512 * 16: 64, 640 * 16: 48, 3 * 512 * 16: 16}
    autograd |= {16 * 256 * 16: 8, 1024 * 1024 * 16: 8}
    for width, tokens in autograd.items():
        assert _default_chunk_size(width, 4, autograd=True) == tokens, width
    assert _default_chunk_size(512 * 16, 8, autograd=True) == 32


@pytest.mark.parametrize("recurrence", [_foreach_recurrence_, _stepwise_recurrence_])
def test_foreach_recurrence_runs_in_order(recurrence):
    """The token loop leans on torch's foreach addcmul visiting its lists in order on CPU (and
    on one addcmul a step elsewhere), each step reading the state the previous one wrote:
    x_j = a_j x_{j-1} + x_j from x_{-1} = 1."""
    a = torch.full((5, 3), 2.0, dtype=torch.float64)
    x = torch.ones(5, 3, dtype=torch.float64)
    recurrence(x.unbind(0), a.unbind(0), torch.ones(3, dtype=torch.float64))
    expected = torch.tensor([3.0, 7.0, 15.0, 31.0, 63.0], dtype=torch.float64)
    assert torch.equal(x[:, 0], expected) and torch.equal(x[:, 2], expected)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_default_chunks_of_a_wide_state(packed):
    """8 sequences of Dm=512, N=16 in fp64 get the shortest default chunks (8 tokens): forward
    and every gradient equal the recurrence across chunk boundaries, dense and packed."""
    Bsz, T, Dm, N, G = (1, 80, 512, 16, 2) if packed else (8, 20, 512, 16, 2)
    lengths = [20, 13, 9, 8, 7, 10, 1, 12] if packed else None
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    assert _default_chunk_size(8 * Dm * N, 8, autograd=True) == 8
    inputs, flags = make_inputs(Bsz, T, Dm, N, G, seed=24, num_seqs=None if cu is None else 8)
    y_ref, final_ref, grads_ref = forward_and_grads(
        selective_scan_recurrent_ref, inputs, flags, cu_seqlens=cu
    )
    y, final, grads = forward_and_grads(selective_scan_chunk_ref, inputs, flags, cu_seqlens=cu)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], F64)


@pytest.mark.parametrize("options", [ALL, ()], ids=["all-options", "plain-call"])
@pytest.mark.parametrize("Dm,N", [(20, 4), (256, 16)], ids=["narrow", "wide"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_defaults_with_and_without_autograd(Dm, N, packed, options):
    """The defaults: the token loop that writes y over its dt buffer (or, for the plain call,
    reads delta where it lies and writes a fresh y), and the autograd path, equal the
    recurrence and leave inputs as they were."""
    lengths = [37, 70, 5] if packed else None
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    Bsz, T = (1, sum(lengths)) if packed else (2, 100)
    num_seqs = None if cu is None else 3
    inputs, flags = make_inputs(Bsz, T, Dm, N, 2, seed=22, options=options, num_seqs=num_seqs)
    before = {k: t.clone() for k, t in inputs.items() if t is not None}
    kwargs = {**flags, "output_final_state": True, "cu_seqlens": cu}
    y_ref, final_ref = selective_scan_recurrent_ref(**inputs, **kwargs)
    kwargs["chunk_size"] = 32
    with torch.inference_mode():
        y, final = selective_scan_chunk_ref(**inputs, **kwargs)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)
    y_grad, final_grad = selective_scan_chunk_ref(**leaves_of(inputs), **kwargs)
    assert y_grad.requires_grad
    assert_close("y (autograd)", y_ref, y_grad.detach(), F64)
    assert_close("final (autograd)", final_ref, final_grad.detach(), F64)
    assert all(torch.equal(inputs[k], t) for k, t in before.items())


@pytest.mark.parametrize("gated", [False, True], ids=["scan", "skip-and-gate"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_token_loop_backward_gradcheck(packed, gated):
    """The token loop's own backward (`_ChunkedTokenLoop`) against finite differences, fp64,
    every input: dt, u, B, C, A, the initial states and, gated, D and z; over chunks of 3
    tokens (the last ragged), two groups; dense (two sequences of 7) or packed (lengths 7, 2,
    5: sequences leave the batch at different chunks)."""
    G, P, N = 2, 5, 3
    lengths = [7, 2, 5] if packed else [7, 7]
    if packed:
        layout, shape = _PackedChunks(lengths, 3, TEST_DEVICE), (1, sum(lengths))
    else:
        layout, shape = _DenseChunks(2, 7, 3), (2, 7)
    dt = randn(*shape, G, P, seed=30, dtype=torch.float64).abs() * 0.5
    u, z = (randn(*shape, G, P, seed=s, dtype=torch.float64) for s in (31, 36))
    h = randn(len(lengths), G, N, P, seed=32, dtype=torch.float64)
    B, C = (randn(*shape, G, N, seed=s, dtype=torch.float64) for s in (33, 34))
    A = -randn(G, N, P, seed=35, dtype=torch.float64).abs() * 2
    D = randn(G, P, seed=37, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (dt, u, B, C, A, h, *((D, z) if gated else ()))]

    def loop(dt, u, B, C, A, h, D=None, z=None):
        laid_out = [layout.gather(t) for t in (dt, u, B, C)]
        z = None if z is None else layout.gather(z)
        y, h_final = _ChunkedTokenLoop.apply(*laid_out, A, h, D, z, layout)
        return layout.scatter(y), h_final

    assert torch.autograd.gradcheck(loop, inputs)


def test_kept_workspace_is_lent_once_and_grows(monkeypatch):
    """A thread's CPU workspace is kept for its next call; a call inside a call gets a fresh
    one; a larger request grows the kept one to fit it and the calls before; one beyond the
    byte cap gets a fresh one and leaves the kept one alone; another dtype replaces it;
    release_kept_workspace drops it."""
    monkeypatch.setattr(reference, "_kept", threading.local())
    like, f32, f64 = torch.zeros(1), torch.float32, torch.float64
    with _borrowed_workspace(100, like, f32, count=2) as first:
        with _borrowed_workspace(10, like, f32, count=2) as inner:
            assert inner is not first
    with _borrowed_workspace(50, like, f32, count=1) as again:
        assert again is first
    with _borrowed_workspace(200, like, f32, count=1) as grown:
        assert grown is not first
        assert grown.holds(200, like.device, f32, count=2)
    beyond = reference._KEPT_WORKSPACE_BYTES // f32.itemsize
    with _borrowed_workspace(beyond, like, f32, count=2) as big:
        assert big is not grown and big.holds(beyond, like.device, f32, count=2)
    with _borrowed_workspace(200, like, f32, count=2) as again:
        assert again is grown
    with _borrowed_workspace(100, like, f64, count=2) as other:
        assert other.buffers[0].dtype == f64 and other is not grown
    assert reference._kept.workspace is other  # the last call's kind is kept
    release_kept_workspace()
    with _borrowed_workspace(100, like, f64, count=2) as fresh:
        assert fresh is not other


def test_scans_sharing_the_kept_workspace_keep_their_gradients():
    """Two scans of different widths, both forwards before either backward (as two layers of a
    model run), share the thread's workspace: each gets the gradients it gets alone."""
    cases = [make_inputs(2, 70, 20, 4, 2, seed=41), make_inputs(1, 90, 36, 16, 1, seed=42)]
    refs = [forward_and_grads(selective_scan_recurrent_ref, *case) for case in cases]
    leaves = [leaves_of(inputs) for inputs, _ in cases]
    outputs = [
        selective_scan_chunk_ref(**leaves_k, **flags, output_final_state=True, chunk_size=32)
        for leaves_k, (_, flags) in zip(leaves, cases, strict=True)
    ]
    for y, final in reversed(outputs):
        backward_random(y, final)
    for (y_ref, final_ref, grads_ref), (y, final), leaves_k in zip(
        refs, outputs, leaves, strict=True
    ):
        assert_close("y", y_ref, y.detach(), F64)
        assert_close("final", final_ref, final.detach(), F64)
        for name, ref in grads_ref.items():
            assert_close(f"d{name}", ref, leaves_k[name].grad, F64)


def test_threads_scanning_at_once_keep_their_own_workspaces():
    """Two threads scanning at the same time, call after call, each with the thread's own kept
    workspace: every result equals the recurrence."""
    cases = [make_inputs(2, 150, 40, 4, 1, seed=43), make_inputs(2, 100, 72, 4, 2, seed=44)]
    refs = [selective_scan_recurrent_ref(**inputs, **flags)[0] for inputs, flags in cases]
    errors = [[], []]

    def scan(i):
        inputs, flags = cases[i]
        for _ in range(10):
            with torch.inference_mode():
                y = selective_scan_chunk_ref(**inputs, **flags, chunk_size=16)[0]
            errors[i].append(float((y - refs[i]).abs().max() / refs[i].abs().max()))

    threads = [threading.Thread(target=scan, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [len(e) for e in errors] == [10, 10]
    assert max(max(e) for e in errors) < 1e-12


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_non_contiguous_inputs(grad):
    """u, delta, z as slices of one projection (as a Mamba layer makes them), B and C as
    transposed views."""
    Bsz, T, Dm, N, G = 2, 50, 24, 4, 2
    inputs, flags = make_inputs(Bsz, T, Dm, N, G, seed=23)
    fused = torch.cat([inputs["u"], inputs["delta"], inputs["z"]], dim=-1)
    strided = dict(inputs)
    strided["u"], strided["delta"], strided["z"] = fused.split(Dm, dim=-1)
    for name in ("B", "C"):
        strided[name] = inputs[name].transpose(0, 1).contiguous().transpose(0, 1)
    assert not any(strided[k].is_contiguous() for k in ("u", "delta", "z", "B", "C"))
    y_ref, final_ref = selective_scan_recurrent_ref(**inputs, **flags, output_final_state=True)
    with torch.set_grad_enabled(grad):
        args = leaves_of(strided) if grad else strided
        y, final = selective_scan_chunk_ref(**args, **flags, output_final_state=True)
    assert_close("y", y_ref, y.detach(), F64)
    assert_close("final", final_ref, final.detach(), F64)


def test_math_matches_an_explicit_loop():
    """Both forms against the recurrence written out scalar by scalar."""
    Bsz, T, Dm, N, G = 2, 6, 4, 3, 2
    inputs, flags = make_inputs(Bsz, T, Dm, N, G, seed=11)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    D, z, bias, h0 = (inputs[k] for k in ("D", "z", "delta_bias", "initial_state"))
    y = torch.zeros(Bsz, T, Dm, dtype=torch.float64)
    final = torch.zeros(Bsz, Dm, N, dtype=torch.float64)
    for b in range(Bsz):
        for d in range(Dm):
            g = d // (Dm // G)
            h = [h0[b, d, n].item() for n in range(N)]
            for t in range(T):
                dt = math.log1p(math.exp(delta[b, t, d].item() + bias[d].item()))
                x = u[b, t, d].item()
                out = 0.0
                for n in range(N):
                    h[n] = math.exp(dt * A[d, n].item()) * h[n] + dt * B[b, t, g, n].item() * x
                    out += C[b, t, g, n].item() * h[n]
                out += D[d].item() * x
                zt = z[b, t, d].item()
                y[b, t, d] = out * zt / (1.0 + math.exp(-zt))
            final[b, d] = torch.tensor(h, dtype=torch.float64)
    for form in (selective_scan_recurrent_ref, selective_scan_chunk_ref):
        y_form, final_form = form(**inputs, **flags, output_final_state=True)
        assert_close(f"{form.__name__} y", y, y_form, F64)
        assert_close(f"{form.__name__} final", final, final_form, F64)


def test_final_state_only_when_asked():
    inputs, flags = make_inputs(1, 5, 4, 2, 1, seed=1)
    for form in (selective_scan_recurrent_ref, selective_scan_chunk_ref):
        y, final = form(**inputs, **flags)
        assert final is None and y.shape == (1, 5, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dtypes(dtype):
    """y comes back in u's dtype; the state is fp32 for any lower-precision input."""
    inputs, flags = make_inputs(1, 9, 8, 4, 2, seed=2, dtype=dtype)
    for form in (selective_scan_recurrent_ref, selective_scan_chunk_ref):
        y, final = form(**inputs, **flags, output_final_state=True)
        assert y.dtype == dtype and final.dtype == torch.float32


# ---- stability ---------------------------------------------------------------------------


@pytest.mark.parametrize("per_step", [20.0, 1e-4], ids=["strong-decay-20", "tiny-decay-1e-4"])
def test_extreme_decays(per_step):
    """delta |A| up to 20 per step (cumulative decays far below fp32's range), or 1e-4 (the
    state barely decays over the whole sequence): finite, and chunked equals recurrent."""
    Bsz, T, Dm, N = 1, 256, 20, 8
    inputs, flags = make_inputs(Bsz, T, Dm, N, 1, seed=5, options=("D", "z", "initial_state"))
    spread = randn(Bsz, T, Dm, seed=6, dtype=torch.float64).sigmoid()  # in (0, 1)
    inputs["delta"] = per_step * spread
    inputs["A"] = -torch.linspace(0.05, 1.0, Dm * N, dtype=torch.float64).view(Dm, N)
    y_ref, final_ref, grads_ref = forward_and_grads(selective_scan_recurrent_ref, inputs, flags)
    y, final, grads = forward_and_grads(selective_scan_chunk_ref, inputs, flags)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], F64)

    fp32 = {k: None if t is None else t.float() for k, t in inputs.items()}
    y32, final32, grads32 = forward_and_grads(selective_scan_chunk_ref, fp32, flags)
    assert all(torch.isfinite(t).all() for t in (y32, final32, *grads32.values()))
    assert_close("fp32 y", y_ref, y32, 1e-5)
    assert_close("fp32 final", final_ref, final32, 1e-5)


# ---- packed sequences ----------------------------------------------------------------------

LENGTHS = [1, 37, 0, 64, 5, 100]


def per_sequence(form, inputs, flags, lengths):
    """Every packed sequence alone (B = 1, its own initial state); cat outputs, stack states."""
    offsets = cu_seqlens_from_lengths(lengths).tolist()
    ys, finals = [], []
    for n, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        piece = {
            k: None if t is None or k in ("A", "D", "delta_bias") else t[:, start:end]
            for k, t in inputs.items()
        }
        piece.update(
            A=inputs["A"],
            D=inputs["D"],
            delta_bias=inputs["delta_bias"],
            initial_state=inputs["initial_state"][n : n + 1],
        )
        y_n, final_n = form(**piece, **flags, output_final_state=True)
        ys.append(y_n)
        finals.append(final_n)
    return torch.cat(ys, dim=1), torch.cat(finals)


@pytest.mark.parametrize("form", [selective_scan_chunk_ref, selective_scan_recurrent_ref])
def test_varlen_equals_per_sequence(form):
    cu = cu_seqlens_from_lengths(LENGTHS)
    inputs, flags = make_inputs(1, sum(LENGTHS), 20, 4, 2, seed=8, num_seqs=len(LENGTHS))
    # Chunks of 16 tokens: sequences end mid-chunk, and drop out of the batch at different steps.
    kwargs = {"chunk_size": 16, "block_size": 4} if form is selective_scan_chunk_ref else {}
    y, final = form(**inputs, **flags, output_final_state=True, cu_seqlens=cu, **kwargs)
    y_ref, final_ref = per_sequence(selective_scan_recurrent_ref, inputs, flags, LENGTHS)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)
    # The empty sequence hands its initial state through unchanged.
    assert torch.equal(final[2], inputs["initial_state"][2])


@pytest.mark.parametrize("block_size", [4, None], ids=["blocks", "token-loop"])
def test_varlen_gradients(block_size):
    cu = cu_seqlens_from_lengths(LENGTHS)
    inputs, flags = make_inputs(1, sum(LENGTHS), 20, 4, 2, seed=9, num_seqs=len(LENGTHS))
    _, _, grads_ref = forward_and_grads(selective_scan_recurrent_ref, inputs, flags, cu_seqlens=cu)
    _, _, grads = forward_and_grads(
        selective_scan_chunk_ref, inputs, flags, cu_seqlens=cu, chunk_size=16, block_size=block_size
    )
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], F64)


def test_varlen_of_empty_sequences_only():
    cu = cu_seqlens_from_lengths([0, 0])
    inputs, flags = make_inputs(1, 0, 4, 2, 1, seed=4, num_seqs=2)
    y, final = selective_scan(**inputs, **flags, cu_seqlens=cu, output_final_state=True)
    assert y.shape == (1, 0, 4)
    assert torch.equal(final, inputs["initial_state"])


# ---- decode --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [0, 1, 37])
def test_prefill_then_decode_equals_full_forward(prefill):
    Bsz, T, Dm, N, G = 2, 45, 20, 4, 2
    inputs, flags = make_inputs(Bsz, T, Dm, N, G, seed=13)
    y_full, final_full = selective_scan(**inputs, **flags, output_final_state=True)

    per_token = ("u", "delta", "z", "B", "C")
    head = {k: t[:, :prefill] if k in per_token else t for k, t in inputs.items()}
    y_head, state = selective_scan(**head, **flags, output_final_state=True)
    ys = [y_head]
    for t in range(prefill, T):
        y_t, state = selective_state_update(
            inputs["u"][:, t],
            inputs["delta"][:, t],
            inputs["A"],
            inputs["B"][:, t],
            inputs["C"][:, t],
            state,
            D=inputs["D"],
            z=inputs["z"][:, t],
            delta_bias=inputs["delta_bias"],
            **flags,
        )
        ys.append(y_t[:, None])
    assert_close("y", y_full, torch.cat(ys, dim=1), F64)
    assert_close("final", final_full, state, F64)


def test_state_update_leaves_the_given_state_alone():
    inputs, flags = make_inputs(3, 1, 8, 4, 2, seed=14)
    state = inputs["initial_state"]
    before = state.clone()
    _, new = selective_state_update(
        inputs["u"][:, 0],
        inputs["delta"][:, 0],
        inputs["A"],
        inputs["B"][:, 0],
        inputs["C"][:, 0],
        state,
        **flags,
    )
    assert torch.equal(state, before) and new.data_ptr() != state.data_ptr()
    assert new.dtype == torch.float64 and new.shape == (3, 8, 4)


# ---- public API ------------------------------------------------------------------------------


def test_public_function_is_the_chunked_path_on_cpu():
    inputs, flags = make_inputs(2, 30, 12, 4, 3, seed=15)
    y, final = selective_scan(**inputs, **flags, output_final_state=True, backend="torch")
    y_ref, final_ref = selective_scan_recurrent_ref(**inputs, **flags, output_final_state=True)
    assert_close("y", y_ref, y, F64)
    assert_close("final", final_ref, final, F64)


def test_registered_backends():
    ops = {op.name: op.backends for op in registered_ops()}
    assert ops["selective_scan"] == ("torch", "triton")
    assert ops["selective_state_update"] == ("torch", "triton")


def test_state_update_refuses_an_unavailable_backend():
    inputs, flags = make_inputs(1, 1, 4, 2, 1, seed=16)
    args = [inputs[k][:, 0] for k in ("u", "delta")] + [inputs["A"]]
    args += [inputs[k][:, 0] for k in ("B", "C")] + [inputs["initial_state"]]
    with pytest.raises(BackendUnavailableError, match="float64"):
        selective_state_update(*args, backend="triton")  # fp64 inputs
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_state_update(*args, backend="fast")


def _call(**changes):
    inputs, flags = make_inputs(1, 8, 6, 4, 2, seed=17, num_seqs=1)
    inputs.update(changes)
    return selective_scan(**inputs, **flags)


@pytest.mark.parametrize(
    "changes,error,match",
    [
        pytest.param(
            {"A": torch.full((6, 4), 0.5, dtype=torch.float64)},
            ValueError,
            "A must be negative",
            marks=pytest.mark.device_assert,
        ),
        (
            {"A": -torch.ones(6, 5, dtype=torch.float64)},
            ValueError,
            r"A must have shape \[D=6, N=4\] \(N=4 from B\)",
        ),
        ({"A": -torch.ones(6, dtype=torch.float64)}, ValueError, "A must have 2 dims"),
        (
            {"B": torch.randn(1, 8, 4, 4, dtype=torch.float64)},
            ValueError,
            "G=4 groups, which must divide the 6 channels",
        ),
        ({"C": torch.randn(1, 8, 1, 4, dtype=torch.float64)}, ValueError, "C must have shape"),
        ({"z": torch.randn(1, 7, 6, dtype=torch.float64)}, ValueError, "z must have shape"),
        ({"D": torch.randn(5, dtype=torch.float64)}, ValueError, "D must have shape"),
        ({"u": torch.ones(1, 8, 6, dtype=torch.int64)}, TypeError, "u must be a floating"),
        (
            {"initial_state": torch.randn(2, 6, 4, dtype=torch.float64)},
            ValueError,
            "initial_state must have shape",
        ),
        ({"cu_seqlens": torch.tensor([0, 3, 8])}, TypeError, "cu_seqlens must have dtype int32"),
        *bad_cu_seqlens_values(8),
    ],
    ids=[
        "A-positive",
        "A-wrong-N",
        "A-1d",
        "G-not-dividing-Dm",
        "C-groups-differ",
        "z-wrong-T",
        "D-wrong-size",
        "u-int",
        "state-wrong-N_seq",
        "cu-int64",
        "cu-not-from-0",
        "cu-decreasing",
        "cu-wrong-end",
    ],
)
def test_bad_inputs_raise_clearly(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_cu_seqlens_needs_batch_one():
    inputs, flags = make_inputs(2, 8, 6, 4, 2, seed=18, options=())
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        selective_scan(**inputs, **flags, cu_seqlens=cu)


def test_state_update_bad_inputs():
    inputs, flags = make_inputs(2, 1, 6, 4, 2, seed=19)
    args = {
        "u": inputs["u"][:, 0],
        "delta": inputs["delta"][:, 0],
        "A": inputs["A"],
        "B": inputs["B"][:, 0],
        "C": inputs["C"][:, 0],
        "state": inputs["initial_state"],
    }
    with pytest.raises(ValueError, match="state must have shape"):
        selective_state_update(**{**args, "state": args["state"][:, :, :3]})
    with pytest.raises(ValueError, match="must divide the 6 channels"):
        selective_state_update(**{**args, "B": torch.randn(2, 4, 4, dtype=torch.float64)})


@pytest.mark.device_assert
def test_state_update_positive_A_is_refused():
    inputs, _ = make_inputs(2, 1, 6, 4, 2, seed=19)
    with pytest.raises(ValueError, match="A must be negative"):
        selective_state_update(
            inputs["u"][:, 0], inputs["delta"][:, 0], -inputs["A"], inputs["B"][:, 0],
            inputs["C"][:, 0], inputs["initial_state"],
        )  # fmt: skip
