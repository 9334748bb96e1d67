"""CPU time and peak memory of linear attention: the chunked path vs the token-by-token recurrence.

Every measurement runs in a fresh subprocess, which allocates its inputs, records its peak
RSS (ru_maxrss) as the baseline, then runs: the memory column is the growth of the peak above
that baseline, so it counts only what the call itself holds. A second fresh process repeats
the run with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every
buffer of 64 KiB or more is its own mapping, returned on free: that column is what the
algorithm holds at its peak, without heap fragmentation (which the recurrence, keeping 2 KiB
outputs between 128 KiB state buffers, suffers from under the default allocator). Forward
passes run under torch.inference_mode(); the "chunk fwd+bwd" rows backpropagate through the
chunked path (the CPU training path) instead. Writes benchmarks/results/linear_attn-cpu.md.

    python benchmarks/linear_attn_cpu.py [--heads 8] [--dim 64] [--lengths 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from common import measure_in_subprocesses, peak_rss_mib, write_result

IMPLS = ("chunk", "recurrent", "chunk fwd+bwd")


def _worker(impl: str, T: int, heads: int, dim: int, repeats: int) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch

    from memzoo.kernels.linear_attn.reference import (
        linear_attn_chunk_ref,
        linear_attn_recurrent_ref,
    )

    def inputs(length: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, length, heads, dim, generator=generator) for _ in range(3))
        g = -torch.rand(1, length, heads, generator=generator) * 0.1
        return [q, k, v, g]

    form = linear_attn_recurrent_ref if impl == "recurrent" else linear_attn_chunk_ref

    def forward(q, k, v, g):
        return form(q, k, v, g=g, scale=dim**-0.5, output_final_state=True)

    def run(tensors):
        if impl == "chunk fwd+bwd":
            leaves = [t.requires_grad_() for t in tensors]
            o, state = forward(*leaves)
            (o.sum() + state.sum()).backward()
            for t in leaves:
                t.grad = None
        else:
            with torch.inference_mode():
                forward(*tensors)

    run(inputs(64))  # thread pools and kernels start here, not inside the measurement
    tensors = inputs(T)
    baseline = peak_rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(tensors)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ms": sorted(times)[len(times) // 2],
        "peak_mib": peak_rss_mib() - baseline,
        "inputs_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _measure(impl: str, T: int, args: argparse.Namespace) -> dict:
    repeats = args.recurrent_repeats if impl == "recurrent" else args.repeats

    def command(count: int) -> list[str]:
        return [
            sys.executable, __file__, "--worker", impl, "--lengths", str(T),
            "--heads", str(args.heads), "--dim", str(args.dim), "--repeats", str(count),
        ]  # fmt: skip

    return {"T": T, "impl": impl, "repeats": repeats, **measure_in_subprocesses(command, repeats)}


def write_table(rows: list[dict], args: argparse.Namespace, command: str) -> Path:
    from memzoo.kernels.linear_attn.reference import _default_chunk_size

    chunk = _default_chunk_size(args.dim, args.dim)
    forward = {(r["T"], r["impl"]): r["ms"] for r in rows}
    lines = [
        f"# linear_attn on CPU {platform.machine()} ({rows[0]['threads']} threads)",
        "",
        f"B=1, H={args.heads}, K=V={args.dim}, fp32, with g and the final state; median of "
        f"{args.repeats} runs ({args.recurrent_repeats} for the recurrence); "
        f"torch {rows[0]['torch']}. Memory: peak RSS growth during the call, measured in a fresh "
        "process after the inputs are allocated, under the default allocator and with glibc's "
        "mmap threshold pinned at 64 KiB (no heap fragmentation: what the algorithm holds). "
        f"'chunk' is `linear_attn_chunk_ref` with its default chunks ({chunk} tokens at this "
        "state size). Forward rows run under inference_mode; 'chunk fwd+bwd' is forward plus "
        "backward (the chunked path's own backward, `_ChunkedLinearAttn`), with a cotangent of "
        f"ones for o and the final state. Command: `{command}`",
        "",
        "| T | implementation | time (ms) | peak memory (MiB) | peak, 64 KiB mmap threshold "
        "(MiB) | recurrence time / this |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = forward.get((r["T"], "recurrent"), float("nan")) / r["ms"]
        speedup = "" if r["impl"] == "chunk fwd+bwd" else f"{ratio:.1f}x"
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['ms']:.1f} | {r['peak_mib']:.1f} "
            f"| {r['peak_mmap_mib']:.1f} | {speedup} |"
        )
    path = write_result("linear_attn-cpu.md", lines)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--recurrent-repeats", type=int, default=3)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(args.worker, args.lengths[0], args.heads, args.dim, args.repeats)
        print(json.dumps(result))
        return

    command = (
        f"python benchmarks/linear_attn_cpu.py --heads {args.heads} --dim {args.dim} "
        f"--lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats} "
        f"--recurrent-repeats {args.recurrent_repeats}"
    )
    print(command)
    rows = []
    for T in args.lengths:
        for impl in IMPLS:
            row = _measure(impl, T, args)
            rows.append(row)
            print(
                f"T={T:>5} {impl:<14} {row['ms']:9.1f} ms  peak {row['peak_mib']:7.1f} MiB "
                f"({row['peak_mmap_mib']:.1f} MiB with a 64 KiB mmap threshold)"
            )
    print(f"wrote {write_table(rows, args, command)}")


if __name__ == "__main__":
    main()
