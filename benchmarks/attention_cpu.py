"""CPU time and peak memory of sliding-window attention: the blocked local path vs a dense mask.

Implementations, all causal, forward only, under torch.inference_mode():
- "window (blocked)": memzoo's torch path, `attention(q, k, v, window=w)`: blocked local
  attention, memory O(T (w + block)).
- "dense masked SDPA": scaled_dot_product_attention with an explicit `[T, T]` boolean band
  mask, built inside the call (it is part of what this approach costs).
- "full causal SDPA": is_causal=True without a window, for context: torch's fused CPU kernel,
  which also needs no `[T, T]` tensor but does O(T^2) work.

Every measurement runs in a fresh subprocess, which allocates its inputs, records its peak RSS
(ru_maxrss) as the baseline, then runs: the memory columns are the growth of the peak above
that baseline. A second fresh process repeats one run with glibc's mmap threshold pinned at
64 KiB (MALLOC_MMAP_THRESHOLD_), so every buffer of 64 KiB or more is its own mapping,
returned on free: what the algorithm holds at its peak, without heap fragmentation. A dense
run predicted (from the previous length, x (T / T_prev)^2) to exceed --dense-max-gib is
skipped and marked so. Writes benchmarks/results/attention-cpu.md.

    python benchmarks/attention_cpu.py [--window 128] [--lengths 1024 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from common import measure_in_subprocesses, peak_rss_mib, write_result

IMPLS = ("window (blocked)", "dense masked SDPA", "full causal SDPA")
DENSE = "dense masked SDPA"


def _worker(impl: str, T: int, args: argparse.Namespace) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from memzoo.kernels import attention
    from memzoo.kernels.attention.reference import allowed_keys

    heads, dim, window = args.heads, args.dim, args.window

    def inputs(length: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return [torch.randn(1, length, heads, dim, generator=generator) for _ in range(3)]

    def run(q, k, v):
        if impl == "window (blocked)":
            return attention(q, k, v, window=window, backend="torch")
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        if impl == DENSE:
            mask = allowed_keys(q.shape[2], True, window, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.inference_mode():
        run(*inputs(256))  # thread pools and kernels start here, not inside the measurement
        tensors = inputs(T)
        baseline = peak_rss_mib()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(*tensors)
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "ms": sorted(times)[len(times) // 2],
        "peak_mib": peak_rss_mib() - baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _measure(impl: str, T: int, args: argparse.Namespace, repeats: int) -> dict:
    def command(count: int) -> list[str]:
        return [
            sys.executable, __file__, "--worker", impl, "--lengths", str(T),
            "--heads", str(args.heads), "--dim", str(args.dim), "--window", str(args.window),
            "--repeats", str(count),
        ]  # fmt: skip

    return {"T": T, "impl": impl, "repeats": repeats, **measure_in_subprocesses(command, repeats)}


def write_table(rows: list[dict], args: argparse.Namespace, command: str) -> Path:
    measured = [r for r in rows if "ms" in r]
    window_ms = {r["T"]: r["ms"] for r in measured if r["impl"] == IMPLS[0]}
    lines = [
        f"# attention on CPU {platform.machine()} ({measured[0]['threads']} threads)",
        "",
        f"B=1, H={args.heads}, D={args.dim}, fp32, causal, forward under inference_mode; "
        f"window w={args.window}; median of {args.repeats} runs ({args.dense_repeats} for the "
        f"two SDPA rows); torch {measured[0]['torch']}. Memory: peak RSS growth during the "
        "call, measured in a fresh process after the inputs are allocated, under the default "
        "allocator and with glibc's mmap threshold pinned at 64 KiB (no heap fragmentation: "
        "what the algorithm holds); per token = the latter / T. 'dense masked SDPA' builds its "
        "[T, T] boolean band mask inside the call; 'full causal SDPA' (is_causal, no window) is "
        "context, not the same function. A dense run predicted to exceed "
        f"{args.dense_max_gib:g} GiB is skipped. Command: `{command}`",
        "",
        "| T | implementation | time (ms) | peak memory (MiB) | peak, 64 KiB mmap threshold "
        "(MiB) | per token (KiB) | time / window time |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(
                f"| {r['T']} | {r['impl']} | skipped: predicted {r['predicted_gib']:.1f} GiB "
                f"> {args.dense_max_gib:g} GiB | | | | |"
            )
            continue
        per_token_kib = r["peak_mmap_mib"] * 1024 / r["T"]
        ratio = r["ms"] / window_ms[r["T"]] if r["T"] in window_ms else float("nan")
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['ms']:.1f} | {r['peak_mib']:.1f} "
            f"| {r['peak_mmap_mib']:.1f} | {per_token_kib:.1f} | {ratio:.1f}x |"
        )
    return write_result("attention-cpu.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dense-repeats", type=int, default=3)
    parser.add_argument("--dense-max-gib", type=float, default=8.0)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.lengths[0], args)))
        return

    command = (
        f"python benchmarks/attention_cpu.py --heads {args.heads} --dim {args.dim} "
        f"--window {args.window} --lengths {' '.join(map(str, args.lengths))} "
        f"--repeats {args.repeats} --dense-repeats {args.dense_repeats} "
        f"--dense-max-gib {args.dense_max_gib:g}"
    )
    print(command)
    rows, last_dense = [], None
    for T in args.lengths:
        for impl in IMPLS:
            if impl == DENSE and last_dense is not None:
                # Dense attention grows as T^2: extrapolate from the previous length.
                predicted_gib = last_dense["peak_mmap_mib"] * (T / last_dense["T"]) ** 2 / 1024
                if predicted_gib > args.dense_max_gib:
                    rows.append({"T": T, "impl": impl, "predicted_gib": predicted_gib})
                    print(f"T={T:>6} {impl:<18} skipped (predicted {predicted_gib:.1f} GiB)")
                    continue
            repeats = args.repeats if impl == IMPLS[0] else args.dense_repeats
            row = _measure(impl, T, args, repeats)
            rows.append(row)
            if impl == DENSE:
                last_dense = row
            print(
                f"T={T:>6} {impl:<18} {row['ms']:9.1f} ms  peak {row['peak_mib']:8.1f} MiB "
                f"({row['peak_mmap_mib']:.1f} MiB with a 64 KiB mmap threshold)"
            )
    print(f"wrote {write_table(rows, args, command)}")


if __name__ == "__main__":
    main()
