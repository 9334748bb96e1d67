"""Time causal_conv1d forward and forward+backward across sequence lengths.

On CUDA: memzoo's Triton kernel vs the torch path (and Dao-AILab causal-conv1d when installed).
On CPU: the torch path (dense batches: W shifted multiply-adds with their own backward) vs
F.conv1d (`conv1d_ref`, the path before it) and the varlen shift form. The backward gets a fixed
random cotangent, as in training. Writes a markdown table to
benchmarks/results/conv1d-<device>.md (and a PNG when matplotlib is installed).

    python benchmarks/conv1d.py [--batch 4] [--dim 1024] [--width 4] [--lengths 512 2048 8192]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from common import slug, write_result

from memzoo.kernels import causal_conv1d
from memzoo.kernels.conv1d.reference import conv1d_ref, conv1d_shift_ref


def _timer(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _implementations(device: torch.device) -> dict:
    """name -> fn(x, w, b) returning y, for what runs on this device."""
    if device.type != "cuda":
        return {
            "torch (dense path)": lambda x, w, b: causal_conv1d(x, w, b, activation="silu")[0],
            "F.conv1d (conv1d_ref)": lambda x, w, b: conv1d_ref(x, w, b, "silu")[0],
            "torch (shift, varlen path)": lambda x, w, b: conv1d_shift_ref(x, w, b, "silu")[0],
        }
    impls = {
        "memzoo triton": lambda x, w, b: causal_conv1d(
            x, w, b, activation="silu", backend="triton"
        )[0],
        "memzoo torch": lambda x, w, b: causal_conv1d(x, w, b, activation="silu", backend="torch")[
            0
        ],
    }
    try:
        from causal_conv1d import causal_conv1d_fn

        impls["causal-conv1d"] = lambda x, w, b: causal_conv1d_fn(
            x.transpose(1, 2), w, b, activation="silu"
        ).transpose(1, 2)
    except ImportError:
        pass
    return impls


def _time_impl(fn, inputs, device: torch.device, repeats: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn(x, w, b)."""
    forward = _timer(lambda: fn(*inputs), device, repeats)
    leaves = [t.clone().requires_grad_() for t in inputs]
    generator = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(inputs[0].shape, device=device, dtype=inputs[0].dtype, generator=generator)
    both = _timer(lambda: fn(*leaves).backward(dy), device, repeats)
    return forward, both


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for T in args.lengths:
        x = torch.randn(args.batch, T, args.dim, device=device, dtype=dtype)
        w = torch.randn(args.dim, args.width, device=device, dtype=dtype)
        b = torch.randn(args.dim, device=device, dtype=dtype)
        for name, fn in _implementations(device).items():
            fwd, both = _time_impl(fn, (x, w, b), device, args.repeats)
            rows.append({"T": T, "impl": name, "fwd_ms": fwd, "fwd_bwd_ms": both})
            print(f"T={T:>6} {name:<28} fwd {fwd:8.3f} ms   fwd+bwd {both:8.3f} ms")
    return rows


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def write_table(rows: list[dict], args: argparse.Namespace) -> Path:
    device = _device_name()
    lines = [
        f"# causal_conv1d on {device}",
        "",
        f"B={args.batch}, D={args.dim}, W={args.width}, silu; median of {args.repeats} runs; "
        f"torch {torch.__version__}. Command: `python benchmarks/conv1d.py "
        f"--batch {args.batch} --dim {args.dim} --width {args.width} "
        f"--lengths {' '.join(map(str, args.lengths))}`",
        "",
        "| T | implementation | forward (ms) | forward+backward (ms) |",
        "|---:|---|---:|---:|",
    ]
    lines += [
        f"| {r['T']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |" for r in rows
    ]
    path = write_result(f"conv1d-{slug(device)}.md", lines)
    _plot(rows, path.with_suffix(".png"), device)
    return path


def _plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        points = [(r["T"], r["fwd_bwd_ms"]) for r in rows if r["impl"] == impl]
        ax.plot(*zip(*points, strict=True), marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="T", ylabel="forward+backward (ms)")
    ax.set_title(f"causal_conv1d on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = run(args)
    print(f"wrote {write_table(rows, args)}")


if __name__ == "__main__":
    main()
