"""GPU timings and peak memory of fused BASED attention against the unfused Taylor-map path.

Fused: `based_attn` (Triton, the 273 Taylor features built on chip). Unfused: the "taylor"
feature map materialised in bf16, then `linear_attn(..., normalize=True)` (Triton). Forward
and forward+backward at B=8, H=16, d=16, V=64, bf16, T in {2048, 8192}. Writes
benchmarks/results/based-<gpu>.md.

    python benchmarks/based.py [--batch 8] [--heads 16] [--value-dim 64] [--lengths 2048 8192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import cuda_time_ms, write_result

from memzoo.kernels import based_attn, linear_attn
from memzoo.kernels.linear_attn import get_feature_map


def _peak_mib(fn) -> float:
    """Peak CUDA memory allocated while fn() runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _implementations():
    """name -> fn(q, k, v) -> o on `[B, T, H, d]` q, k and `[B, T, H, V]` v."""
    taylor = get_feature_map("taylor")
    return {
        "fused based_attn": lambda q, k, v: based_attn(q, k, v)[0],
        "unfused taylor + linear_attn": lambda q, k, v: linear_attn(
            taylor(q), taylor(k), v, normalize=True
        )[0],
    }


def _measure(fn, inputs, leaves, repeats: int) -> dict:
    """Forward ms (no grad), forward+backward ms, and forward+backward peak MiB of fn."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        fn(*leaves).float().sum().backward()

    return {
        "fwd": cuda_time_ms(forward, repeats),
        "fwd_bwd": cuda_time_ms(forward_backward, repeats),
        "fwd_bwd_mib": _peak_mib(forward_backward),
    }


def run(args) -> list[dict]:
    rows = []
    B, H, V = args.batch, args.heads, args.value_dim
    for T in args.lengths:
        q, k = (torch.randn(B, T, H, 16, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        for name, fn in _implementations().items():
            row = {"T": T, "impl": name, **_measure(fn, (q, k, v), leaves, args.repeats)}
            rows.append(row)
            print(
                f"T={T:>6} {name:<30} fwd {row['fwd']:8.3f} ms  fwd+bwd {row['fwd_bwd']:8.3f} ms"
                f"  peak {row['fwd_bwd_mib']:9.1f} MiB",
                flush=True,
            )
    return rows


def write_table(rows, args) -> Path:
    device = torch.cuda.get_device_name(0)
    unfused = {r["T"]: r for r in rows if r["impl"].startswith("unfused")}
    lines = [
        f"# BASED attention on {device}",
        "",
        f"B={args.batch}, H={args.heads}, d=16 (273 Taylor features), V={args.value_dim}, bf16, "
        f"causal, normalised; median of {args.repeats} runs; torch {torch.__version__}. Ratios "
        "are to the unfused path at the same T (< 1 is faster / smaller).",
        "",
        "| T | implementation | fwd (ms) | fwd+bwd (ms) | fwd+bwd peak (MiB) | fwd ratio "
        "| fwd+bwd ratio | memory ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = unfused[r["T"]]
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['fwd']:.3f} | {r['fwd_bwd']:.3f} | "
            f"{r['fwd_bwd_mib']:.0f} | {r['fwd'] / base['fwd']:.2f} | "
            f"{r['fwd_bwd'] / base['fwd_bwd']:.2f} | {r['fwd_bwd_mib'] / base['fwd_bwd_mib']:.2f} |"
        )
    path = write_result(f"based-{device.lower().replace(' ', '-')}.md", lines)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("based.py needs a CUDA device (it times Triton kernels); nothing to do here")
        return
    print(f"wrote {write_table(run(args), args)}")


if __name__ == "__main__":
    main()
