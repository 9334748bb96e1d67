"""Pick the Triton selective scan's launch shape on a GPU: tile sizes, warps and segments, timed.

Each variant (BT tokens x BD channels per tile, forward warps, backward warps of the tiled
passes), forms of the main passes (forward/backward, each `tiles` or `looped`; a looped
backward at each shape of --looped-backward, BT,BD,warps) and segmenting (`rule`: the
launcher's own `_segment_length`; `whole`: one program per sequence and channel block; a
number: segments of that many rows) is first checked against the fp64 torch reference (fp32
inputs, forward and every gradient), then timed forward and forward+backward in bf16 at
Mamba's shape (Dm=1536, N=16, softplus, D, z). Writes
benchmarks/results/selective_scan_launch-<gpu>.md.

    python benchmarks/selective_scan_launch_gpu.py [--batch 2] [--lengths 8192]
        [--variants 8,16,4,8 8,32,4,8] [--segments rule whole 1024]
        [--forms tiles/tiles looped/looped tiles/looped] [--looped-backward 32,4,4 32,8,8]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from unittest import mock

import torch
from common import cuda_time_ms, slug, write_result

from memzoo.kernels import selective_scan
from memzoo.kernels.selective_scan import triton as scan_triton
from memzoo.kernels.testing import relative_rmse

# (BT, BD, forward warps, backward warps), the same for both passes; or "shipped": the
# launcher's own shapes (8 x 16 forward tiles at 4 warps, 8 x 32 backward tiles at 8).
VARIANTS = [(8, 16, 4, 8), (8, 32, 4, 8), (4, 64, 8, 8), (2, 128, 8, 8)]
SHIPPED = "shipped"


def _patched(variant, segments="rule", forms=("tiles", "tiles")):
    """Context manager that makes the kernels launch with `variant`, `segments` and `forms`:
    the forward's ("tiles" or "looped") and the backward's ("tiles", or (BT, BD, warps) of a
    looped backward)."""
    forward, backward = forms
    patches = {"FORWARD": forward, "BACKWARD": "tiles" if backward == "tiles" else "looped"}
    if backward != "tiles":
        patches["LOOPED_BWD"] = backward
    if variant != SHIPPED:
        BT, BD, fwd_warps, bwd_warps = variant

        def launch(N, channels_per_group, backward=False):
            return {"BT": BT, "BD": BD, "BN": max(2, 1 << (N - 1).bit_length())}

        patches.update(_launch=launch, FWD_WARPS=fwd_warps, BWD_WARPS=bwd_warps)
    if segments != "rule":
        rows = None if segments == "whole" else int(segments)
        tile = 8 if variant == SHIPPED else variant[0]
        if rows is not None and rows % tile:
            raise ValueError(f"segments of {rows} rows do not cut on tiles of {tile}")
        patches["_segment_length"] = lambda *args: rows
    return mock.patch.multiple(scan_triton, **patches) if patches else contextlib.nullcontext()


def _inputs(batch, T, Dm, N, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dt)

    return {
        "u": rnd(batch, T, Dm), "delta": rnd(batch, T, Dm, scale=0.5),
        "A": -(0.1 + 2 * torch.rand(Dm, N, generator=gen, device="cuda")),
        "B": rnd(batch, T, 1, N), "C": rnd(batch, T, 1, N), "D": rnd(Dm, dt=torch.float32),
        "z": rnd(batch, T, Dm), "delta_bias": rnd(Dm, dt=torch.float32, scale=0.5),
    }  # fmt: skip


def _forward_backward(inputs, backend, cotangent=None):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    y, _ = selective_scan(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
        z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True, backend=backend,
    )  # fmt: skip
    if cotangent is None:
        cotangent = torch.randn(y.shape, device=y.device, dtype=torch.float64)
    (y.double() * cotangent).sum().backward()
    return y, {n: t.grad for n, t in leaves.items()}, cotangent


def worst_error(variant, segments, forms) -> float:
    """Largest relative RMSE over y and every gradient, fp32 kernel vs fp64 reference."""
    inputs = _inputs(2, 333, 200, 16, torch.float32, seed=0)
    if segments != "whole":
        segments = "96"  # short inputs: the segmented path, 4 segments a sequence
    with _patched(variant, segments, forms):
        y, grads, cot = _forward_backward(inputs, "triton")
    ref_inputs = {n: t.double() for n, t in inputs.items()}
    y_ref, grads_ref, _ = _forward_backward(ref_inputs, "torch", cot)
    errors = [relative_rmse(y_ref, y)] + [relative_rmse(grads_ref[n], grads[n]) for n in grads]
    return max(errors)


def timings(variant, segments, forms, batch, T) -> tuple[float, float]:
    inputs = _inputs(batch, T, 1536, 16, torch.bfloat16, seed=1)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}

    def forward(t):
        return selective_scan(
            t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
            delta_bias=t["delta_bias"], delta_softplus=True, backend="triton",
        )[0]  # fmt: skip

    with _patched(variant, segments, forms):
        fwd = cuda_time_ms(lambda: forward(inputs), repeats=10)
        both = cuda_time_ms(lambda: forward(leaves).float().sum().backward(), repeats=10)
    return fwd, both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument(
        "--variants", nargs="+", default=[",".join(map(str, v)) for v in VARIANTS],
        help="BT,BD,forward warps,backward warps (e.g. 8,32,4,8), or shipped",
    )  # fmt: skip
    parser.add_argument(
        "--segments", nargs="+", default=["rule", "whole"],
        help="rule (the launcher's choice), whole (no segments) or rows per segment (a "
        "multiple of every variant's BT)",
    )  # fmt: skip
    parser.add_argument(
        "--forms", nargs="+", default=["tiles/tiles"],
        choices=[f"{f}/{b}" for f in ("tiles", "looped") for b in ("tiles", "looped")],
        help="forward/backward forms of the main passes",
    )  # fmt: skip
    parser.add_argument(
        "--looped-backward", nargs="+", default=[",".join(map(str, scan_triton.LOOPED_BWD))],
        help="BT,BD,warps of a looped backward (e.g. 32,4,4)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default="selective_scan_launch", help="results/<name>-<gpu>.md is written"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("selective_scan_launch_gpu.py needs a CUDA device")
        return
    device = torch.cuda.get_device_name(0)
    lines = [
        f"# selective scan launch shapes on {device}",
        "",
        f"bf16, B={args.batch}, Dm=1536, N=16, softplus + D + z; median of 10 runs; error = worst "
        "relative RMSE of y and all gradients, fp32 kernel vs fp64 reference (B=2, T=333, "
        "Dm=200; in segments of 96 rows unless `whole`); segments `rule`: the launcher's "
        f"choice; torch {torch.__version__}. Reproduce: `python "
        "benchmarks/selective_scan_launch_gpu.py "
        f"--batch {args.batch} --lengths {' '.join(map(str, args.lengths))} "
        f"--variants {' '.join(args.variants)} --segments {' '.join(args.segments)} "
        f"--forms {' '.join(args.forms)} --looped-backward {' '.join(args.looped_backward)}`. "
        "Forms: forward/backward, a looped backward as `looped BTxBD/warps`; the variant's tiles "
        "are those of the tiled passes.",
        "",
        "| BT | BD | warps fwd/bwd | forms | segments | error | T | fwd (ms) | fwd+bwd (ms) |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    variants = [v if v == SHIPPED else tuple(int(x) for x in v.split(",")) for v in args.variants]
    looped = [tuple(int(x) for x in shape.split(",")) for shape in args.looped_backward]
    forms = []
    for pair in args.forms:
        forward, backward = pair.split("/")
        forms += (
            [(forward, shape) for shape in looped] if backward == "looped" else [(forward, "tiles")]
        )
    for variant, (forward, backward), segments in itertools.product(variants, forms, args.segments):
        BT, BD, fw, bw = ("8", "16/32", "4", "8") if variant == SHIPPED else variant
        backward_name = backward if backward == "tiles" else "looped {}x{}/{}".format(*backward)
        form = f"{forward}/{backward_name}"
        row = f"| {BT} | {BD} | {fw}/{bw} | {form} | {segments} |"
        try:
            error = worst_error(variant, segments, (forward, backward))
        except Exception as exc:  # a variant that fails to compile is a row, not a crash
            print(f"BT={BT} BD={BD} {form} {segments}: {type(exc).__name__}: {exc}", flush=True)
            lines.append(f"{row} failed: {type(exc).__name__} | | | |")
            continue
        for T in args.lengths:
            fwd, both = timings(variant, segments, (forward, backward), args.batch, T)
            print(f"BT={BT:>2} BD={BD:>4} warps {fw}/{bw} {form} segments {segments:>5} "
                  f"err {error:.1e} T={T:>6} fwd {fwd:8.3f} ms fwd+bwd {both:8.3f} ms",
                  flush=True)  # fmt: skip
            lines.append(f"{row} {error:.1e} | {T} | {fwd:.3f} | {both:.3f} |")
    print(f"wrote {write_result(f'{args.name}-{slug(device)}.md', lines)}")


if __name__ == "__main__":
    main()
