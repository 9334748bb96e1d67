"""Triton selective scan (Mamba-1) vs the fp64 token-by-token reference, forward and gradients."""

from types import SimpleNamespace

import pytest
import torch

from memzoo.kernels.selective_scan import selective_scan, selective_state_update
from memzoo.kernels.selective_scan.reference import (
    selective_scan_recurrent_ref,
    selective_state_update_ref,
)
from memzoo.kernels.testing import TEST_DEVICE, assert_close, cu_seqlens_from_lengths, randn

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, T, Dm, N, G, *, seed, options=True, num_states=None, decay=(0.1, 2.0)):
    """fp64 inputs by name; D, z and delta_bias only with `options`."""
    low, high = decay
    inputs = {
        "u": randn(batch, T, Dm, seed=seed),
        "delta": randn(batch, T, Dm, seed=seed + 1, scale=0.5),
        "A": -(low + (high - low) * torch.rand(Dm, N, generator=torch.Generator().manual_seed(seed),
                                               dtype=torch.float64, device="cpu")).to(TEST_DEVICE),
        "B": randn(batch, T, G, N, seed=seed + 2),
        "C": randn(batch, T, G, N, seed=seed + 3),
        "initial_state": randn(num_states or batch, Dm, N, seed=seed + 4),
    }  # fmt: skip
    if options:
        inputs["D"] = randn(Dm, seed=seed + 5)
        inputs["z"] = randn(batch, T, Dm, seed=seed + 6)
        inputs["delta_bias"] = randn(Dm, seed=seed + 7, scale=0.5)
    return inputs


def run(inputs, dtype, *, softplus, backend, cu_seqlens=None, seed=21):
    """Forward + backward with random cotangents; returns y, final state, grads by name."""
    leaves = {}
    for name, t in inputs.items():
        keep_fp32 = name in ("A", "initial_state") and dtype != torch.float64
        leaves[name] = t.detach().to(torch.float32 if keep_fp32 else dtype).requires_grad_()
    args = {n: leaves[n] for n in ("D", "z", "delta_bias", "initial_state") if n in leaves}
    fn = selective_scan if backend != "reference" else selective_scan_recurrent_ref
    kwargs = {} if backend == "reference" else {"backend": backend}
    y, final = fn(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **args,
        delta_softplus=softplus, output_final_state=True, cu_seqlens=cu_seqlens, **kwargs,
    )  # fmt: skip
    loss = (y.double() * randn(*y.shape, seed=seed, dtype=torch.float64)).sum()
    loss = loss + (final.double() * randn(*final.shape, seed=seed + 1, dtype=torch.float64)).sum()
    loss.backward()
    return y, final, {n: t.grad for n, t in leaves.items()}


def check(inputs, *, softplus, dtype=torch.float32, ratio=1e-4):
    y, final, grads = run(inputs, dtype, softplus=softplus, backend="triton")
    rounded = {n: t.to(dtype).double() if n not in ("A", "initial_state") else t.float().double()
               for n, t in inputs.items()}  # fmt: skip
    y_ref, final_ref, grads_ref = run(
        rounded, torch.float64, softplus=softplus, backend="reference"
    )
    assert y.dtype == dtype and final.dtype == torch.float32
    assert_close("y", y_ref, y, ratio)
    assert_close("final_state", final_ref, final, ratio)
    for name in inputs:
        assert_close(f"d{name}", grads_ref[name], grads[name], ratio)


CASES = [
    pytest.param(1, 20, 4, 1, True, True, id="T1-Dm20-N4-G1-opts-softplus"),
    pytest.param(63, 20, 16, 2, True, True, id="T63-Dm20-N16-G2-opts-softplus"),
    pytest.param(100, 12, 16, 1, False, False, id="T100-Dm12-N16-G1-plain"),
    pytest.param(256, 20, 4, 2, True, True, id="T256-Dm20-N4-G2-opts-softplus"),
    pytest.param(100, 12, 4, 2, True, False, id="T100-Dm12-N4-G2-opts"),
    pytest.param(63, 20, 4, 1, False, True, id="T63-Dm20-N4-G1-softplus-no-bias"),
]


def use_forms(monkeypatch, forward, backward):
    """Run the Triton scan with these forms of its main passes (`FORWARD`, `BACKWARD`)."""
    scan = pytest.importorskip("memzoo.kernels.selective_scan.triton")
    monkeypatch.setattr(scan, "FORWARD", forward)
    monkeypatch.setattr(scan, "BACKWARD", backward)


@pytest.fixture(params=["tiles", "looped"])
def form(request, monkeypatch):
    """Each form of the main passes, both ways: tiles of (token, channel, state), or the
    states looped over tiles of (token, channel)."""
    use_forms(monkeypatch, request.param, request.param)
    return request.param


@pytest.mark.parametrize("T,Dm,N,G,options,softplus", CASES)
def test_forward_and_gradients_fp32(form, T, Dm, N, G, options, softplus):
    inputs = make_inputs(2 if T < 100 else 1, T, Dm, N, G, seed=T + Dm, options=options)
    if not softplus:  # the step size must then be >= 0 by itself, as Mamba's always is
        for name in ("delta", "delta_bias"):
            if name in inputs:
                inputs[name] = inputs[name].abs()
    check(inputs, softplus=softplus)


def test_fp16_inputs():
    check(make_inputs(1, 40, 20, 4, 2, seed=3), softplus=True, dtype=torch.float16, ratio=5e-3)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_softplus_over_its_whole_range(bias):
    """delta + bias from -40 (softplus ~ 4e-18) through the threshold at 20 to 60, inside the
    kernels: y, the final state and every gradient, ddelta and ddelta_bias included."""
    inputs = make_inputs(1, 50, 20, 4, 2, seed=12, decay=(1e-4, 1e-3))
    raw = torch.linspace(-40, 60, 50 * 20, dtype=torch.float64).view(1, 50, 20)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0), device="cpu")
    inputs["delta"] = raw[:, order.to(raw.device)]
    if bias:
        inputs["delta_bias"] = randn(20, seed=13, scale=2.0)
    else:
        del inputs["delta_bias"]
    check(inputs, softplus=True)


@pytest.mark.parametrize("decay", [(10.0, 40.0), (1e-4, 2e-4)], ids=["strong", "tiny"])
def test_extreme_decay_stays_accurate(form, decay):
    """delta |A| up to ~20 per step (delta ~ 0.5) and down to ~1e-4."""
    inputs = make_inputs(1, 40, 12, 4, 1, seed=8, options=False, decay=decay)
    inputs["delta"] = inputs["delta"].abs() + 0.05
    y, final, grads = run(inputs, torch.float32, softplus=False, backend="triton")
    for name, t in [("y", y), ("final", final), *grads.items()]:
        assert torch.isfinite(t).all(), name
    check(inputs, softplus=False)


def test_varlen_equals_per_sequence(form):
    lengths = [1, 20, 0, 9]
    inputs = make_inputs(1, sum(lengths), 20, 4, 2, seed=4, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    y, final, grads = run(inputs, torch.float32, softplus=True, backend="triton", cu_seqlens=cu)
    offsets = cu.tolist()
    dy = randn(*y.shape, seed=21, dtype=torch.float64)
    dfinal = randn(*final.shape, seed=22, dtype=torch.float64)
    for n in range(len(lengths)):
        start, end = offsets[n], offsets[n + 1]
        part = {
            name: (t[:, start:end] if name in ("u", "delta", "B", "C", "z") else t)
            for name, t in inputs.items()
        }
        part["initial_state"] = inputs["initial_state"][n : n + 1]
        leaves = {name: t.detach().float().requires_grad_() for name, t in part.items()}
        args = {k: leaves[k] for k in ("D", "z", "delta_bias", "initial_state")}
        y_n, final_n = selective_scan(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **args,
            delta_softplus=True, output_final_state=True, backend="triton",
        )  # fmt: skip
        assert_close(f"y[{n}]", y_n, y[:, start:end], 1e-5)
        assert_close(f"final[{n}]", final_n, final[n : n + 1], 1e-5)
        loss = (y_n.double() * dy[:, start:end]).sum() + (final_n.double() * dfinal[n]).sum()
        loss.backward()
        for name in ("u", "delta", "B", "C", "z"):
            assert_close(f"d{name}[{n}]", leaves[name].grad, grads[name][:, start:end], 1e-5)
        assert_close(
            f"dinit[{n}]", leaves["initial_state"].grad, grads["initial_state"][n : n + 1], 1e-5
        )


@pytest.fixture
def scan_triton():
    return pytest.importorskip("memzoo.kernels.selective_scan.triton")


def force_segments(monkeypatch, scan_triton, length):
    """Launch segmented (or, with None, whole sequences) whatever the device."""
    monkeypatch.setattr(scan_triton, "_segment_length", lambda *args: length)


@pytest.mark.parametrize(
    "form,T,segment,options,Dm,N,G",
    [("tiles", 63, 8, True, 20, 4, 2), ("tiles", 100, 24, False, 20, 4, 2),
     ("tiles", 17, 16, True, 20, 4, 2), ("tiles", 40, 16, True, 40, 16, 1),
     ("looped", 63, 8, True, 20, 4, 2), ("looped", 100, 40, False, 20, 4, 2),
     ("looped", 40, 16, True, 8, 16, 1)],
    ids=["tiles-T63-seg8", "tiles-T100-seg24", "tiles-T17-seg16-last-segment-short",
         "tiles-T40-seg16-Dm40-N16-first-pass-narrower-blocks", "looped-T63-seg8",
         "looped-T100-seg40-a-tile-and-a-part", "looped-T40-seg16-N16-segments-inside-a-tile"],
)  # fmt: skip
def test_segmented_launch_forward_and_gradients(
    monkeypatch, scan_triton, form, T, segment, options, Dm, N, G
):
    """Segments scanned side by side, joined by the segment passes, equal the fp64 reference:
    y, final state and every gradient (dinitial_state from the reverse pass). At N=16 and 40
    channels the tiled backward's first pass over segments walks blocks of 16 channels, its
    main pass blocks of 32; the looped backward's tiles of 32 rows start at every segment's
    start and stop at its end (segments of 40 rows: a whole tile and 8 rows of the next)."""
    use_forms(monkeypatch, form, form)
    force_segments(monkeypatch, scan_triton, segment)
    inputs = make_inputs(2, T, Dm, N, G, seed=T, options=options)
    check(inputs, softplus=True)


def test_segmented_varlen_equals_whole_sequences(monkeypatch, scan_triton, form):
    """Packed sequences of every kind of length (empty, shorter than a segment, several
    segments with a short last one) give what the unsegmented launch gives."""
    lengths = [1, 20, 0, 9, 33]
    inputs = make_inputs(1, sum(lengths), 12, 4, 1, seed=6, num_states=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    runs = {}
    for segment in (None, 8):
        force_segments(monkeypatch, scan_triton, segment)
        runs[segment] = run(inputs, torch.float32, softplus=True, backend="triton", cu_seqlens=cu)
    (y, final, grads), (y_seg, final_seg, grads_seg) = runs[None], runs[8]
    assert_close("y", y, y_seg, 1e-5)
    assert_close("final", final, final_seg, 1e-5)
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_seg[name], 1e-5)


@pytest.mark.parametrize("segment", [None, 8], ids=["whole", "segmented"])
def test_inference_forward_equals_training_forward(monkeypatch, scan_triton, form, segment):
    """Without autograd the forward keeps no tile states; its output is the same."""
    force_segments(monkeypatch, scan_triton, segment)
    inputs = {n: t.float() for n, t in make_inputs(2, 30, 12, 4, 2, seed=9).items()}
    args = {n: inputs[n] for n in ("D", "z", "delta_bias", "initial_state")}
    main = [inputs[n] for n in ("u", "delta", "A", "B", "C")]
    kwargs = {"delta_softplus": True, "output_final_state": True, "backend": "triton"}
    with torch.no_grad():
        y, final = selective_scan(*main, **args, **kwargs)
    leaves = [t.clone().requires_grad_() for t in main]
    y_grad, final_grad = selective_scan(*leaves, **args, **kwargs)
    assert_close("y", y_grad.detach(), y, 1e-6)
    assert_close("final", final_grad.detach(), final, 1e-6)


@pytest.mark.cpu
def test_segment_length_rule(monkeypatch, scan_triton):
    """Segments only where the launch leaves multiprocessors idle, as many per sequence as
    fit in one wave, at least MIN_SEGMENT rows, cut on 16 rows; the compiled kernel's
    occupancy (`per_sm`) is asked for only where segments are considered."""
    monkeypatch.setattr(scan_triton, "sm_count", lambda device: 132)
    rule, gpu = scan_triton._segment_length, SimpleNamespace(type="cuda", index=0)

    def never():
        raise AssertionError("occupancy asked for where no segments can be cut")

    # B=2, Dm=1536, N=16: 96 forward programs a sequence; 132 x 8 fit at once: 5 segments each.
    assert rule(192, lambda: 8, 2 * 16384, 2, gpu, 8) == 3280
    # Compiled with 91 registers a thread (Triton 3.6), 5 fit: 3 segments, 16 rows a step.
    assert rule(192, lambda: 5, 2 * 16384, 2, gpu, 8) == 5472
    # Its backward (48 programs a sequence, one a multiprocessor): one sequence, 2 segments;
    # two sequences already hold 96 of the 132 and 192 would not fit in one wave.
    assert rule(48, lambda: 1, 16384, 1, gpu, 8) == 8192
    assert rule(96, lambda: 1, 2 * 16384, 2, gpu, 8) is None
    assert rule(192, never, 2 * 300, 2, gpu, 8) is None  # too short to cut
    assert rule(8, lambda: 8, 4096, 1, gpu, 8) == scan_triton.MIN_SEGMENT
    assert rule(8, never, 4096, 1, SimpleNamespace(type="cpu", index=None), 8) is None


# ---- decode step ----------------------------------------------------------------------------


def step_inputs(batch, Dm, N, G, *, seed, options=True):
    """One token's inputs (fp64) by name, the state under "state"."""
    inputs = make_inputs(batch, 1, Dm, N, G, seed=seed, options=options)
    step = {n: t[:, 0] if n in ("u", "delta", "B", "C", "z") else t for n, t in inputs.items()}
    step["state"] = step.pop("initial_state")
    return step


def run_step(step, dtype, *, softplus, backend):
    cast = {n: t.float() if n in ("A", "state") else t.to(dtype) for n, t in step.items()}
    if backend == "reference":
        cast = {n: t.double() for n, t in cast.items()}
        return selective_state_update_ref(**cast, delta_softplus=softplus)
    return selective_state_update(**cast, delta_softplus=softplus, backend=backend)


@pytest.mark.parametrize(
    "Dm,N,G,options,softplus",
    [(20, 4, 2, True, True), (20, 16, 1, False, False), (12, 16, 2, True, False),
     (40, 5, 1, True, True)],
    ids=["Dm20-N4-G2-opts-softplus", "Dm20-N16-G1-plain", "Dm12-N16-G2-opts",
         "Dm40-N5-G1-opts-softplus"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_state_update_matches_reference(Dm, N, G, options, softplus, dtype):
    step = step_inputs(3, Dm, N, G, seed=Dm + N, options=options)
    if not softplus:
        step["delta"] = step["delta"].abs()
        if "delta_bias" in step:
            step["delta_bias"] = step["delta_bias"].abs()
    y, state = run_step(step, dtype, softplus=softplus, backend="triton")
    y_ref, state_ref = run_step(step, dtype, softplus=softplus, backend="reference")
    assert y.dtype == dtype and state.dtype == torch.float32 and state.shape == (3, Dm, N)
    ratio = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close("y", y_ref, y, ratio)
    assert_close("state", state_ref, state, 1e-5)


def test_state_update_softplus_over_its_whole_range():
    """delta + bias from -40 (softplus ~ 4e-18) through the threshold at 20 to 60."""
    step = step_inputs(1, 64, 4, 1, seed=3)
    step["delta"] = torch.linspace(-40, 60, 64, dtype=torch.float64)[None]
    step["delta_bias"] = torch.zeros_like(step["delta_bias"])
    step["A"] = step["A"] * 1e-3  # large steps must not wipe the state out entirely
    y, state = run_step(step, torch.float32, softplus=True, backend="triton")
    y_ref, state_ref = run_step(step, torch.float32, softplus=True, backend="reference")
    assert_close("y", y_ref, y, 1e-5)
    assert_close("state", state_ref, state, 1e-5)


def test_triton_prefill_then_decode_equals_full_scan():
    inputs = {n: t.float() for n, t in make_inputs(2, 21, 20, 4, 2, seed=11).items()}
    per_token = ("u", "delta", "z", "B", "C")
    flags = {"delta_softplus": True, "backend": "triton"}
    shared = {n: inputs[n] for n in ("A", "D", "delta_bias")}
    y_full, final_full = selective_scan(
        **{n: inputs[n] for n in (*per_token, *shared)}, initial_state=inputs["initial_state"],
        output_final_state=True, **flags,
    )  # fmt: skip
    head = {n: inputs[n][:, :9] for n in per_token}
    y_head, state = selective_scan(
        **head, **shared, initial_state=inputs["initial_state"], output_final_state=True,
        **flags,
    )  # fmt: skip
    ys = [y_head]
    for t in range(9, 21):
        y_t, state = selective_state_update(
            *(inputs[n][:, t] for n in ("u", "delta")), inputs["A"],
            *(inputs[n][:, t] for n in ("B", "C")), state, z=inputs["z"][:, t],
            D=inputs["D"], delta_bias=inputs["delta_bias"], **flags,
        )  # fmt: skip
        ys.append(y_t[:, None])
    assert_close("y", y_full, torch.cat(ys, dim=1), 1e-5)
    assert_close("final", final_full, state, 1e-5)


def test_state_update_of_no_sequences():
    step = {n: t.float()[:0] if t.dim() > 1 and n != "A" else t.float()
            for n, t in step_inputs(2, 8, 4, 1, seed=5).items()}  # fmt: skip
    y, state = selective_state_update(**step, backend="triton")
    assert y.shape == (0, 8) and state.shape == (0, 8, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    inputs = {n: t.cuda() for n, t in make_inputs(2, 2000, 256, 16, 2, seed=1).items()}
    y, final, _ = run(inputs, dtype, softplus=True, backend="triton")
    y_ref, final_ref, _ = run(inputs, torch.float64, softplus=True, backend="torch")
    assert_close("y", y_ref, y, 2e-2)
    assert_close("final", final_ref, final, 2e-2)


@pytest.mark.gpu
def test_cuda_segmented_by_the_rule_fp32(scan_triton, form):
    """One long, narrow sequence, which the launcher cuts into segments on any GPU: fp32
    forward and every gradient against the fp64 reference."""
    T, Dm = 3000, 64
    device = torch.device("cuda", 0)
    for backward in (False, True):  # even at one program a multiprocessor
        programs = Dm // scan_triton._launch(16, Dm, backward=backward)["BD"]
        assert scan_triton._segment_length(programs, lambda: 1, T, 1, device, 8) is not None
    inputs = {n: t.cuda() for n, t in make_inputs(1, T, Dm, 16, 1, seed=2).items()}
    check(inputs, softplus=True)


@pytest.mark.parametrize("segment", [None, 40], ids=["whole", "segmented"])
@pytest.mark.parametrize("forward,backward", [("looped", "tiles"), ("tiles", "looped")])
def test_either_forward_feeds_either_backward(monkeypatch, scan_triton, forward, backward, segment):
    """Both forwards store the state entering every 8 rows, which both backwards read: mixed,
    they equal the fp64 reference (segments of 40 rows: a looped tile and 8 rows of the next)."""
    use_forms(monkeypatch, forward, backward)
    force_segments(monkeypatch, scan_triton, segment)
    check(make_inputs(2, 90, 20, 4, 2, seed=11), softplus=True)


@pytest.mark.parametrize("name", ["FORWARD", "BACKWARD"])
def test_unknown_form_is_a_clear_error(monkeypatch, scan_triton, name):
    monkeypatch.setattr(scan_triton, name, "fused")
    launch = scan_triton._forward_launch if name == "FORWARD" else scan_triton._backward_launch
    with pytest.raises(ValueError, match=f"{name} must be 'tiles' or 'looped', got 'fused'"):
        launch(16, 64)


@pytest.mark.gpu
def test_cuda_forms_agree_in_bf16(monkeypatch, scan_triton):
    """At a Mamba block's shape in bf16, the looped passes' y, final state and gradients (dB
    and dC summed by atomic adds) equal the tiled ones' to bf16's rounding."""
    inputs = {n: t.cuda() for n, t in make_inputs(2, 1500, 512, 16, 1, seed=3).items()}
    runs = {}
    for form in ("tiles", "looped"):
        use_forms(monkeypatch, form, form)
        runs[form] = run(inputs, torch.bfloat16, softplus=True, backend="triton")
    (y, final, grads), (y_looped, final_looped, grads_looped) = runs["tiles"], runs["looped"]
    assert_close("y", y.double(), y_looped.double(), 1e-2)
    assert_close("final", final.double(), final_looped.double(), 1e-2)
    for name, tiled in grads.items():
        assert_close(f"d{name}", tiled.double(), grads_looped[name].double(), 1e-2)
