"""CPU time of the Mixture-of-Memories layer against a single memory of the same width and state.

Layer rows: `MixtureOfMemories` with the paper's routing (4 memories, top-2, a shared memory)
against the same layer with one memory, top-1, no shared memory: a gated linear attention with
the same width, heads and per-memory state [H, dk, dv]. Forward rows run under
torch.inference_mode, "fwd+bwd" rows backpropagate a sum of the output.
Kernel rows: `memzoo.kernels.mom.memory_attn` alone at the layer's shapes, by its two methods:
"masked" (every memory over every token, the CPU path) and "grouped" (tokens grouped by
memory, one varlen linear_attn call; on torch that call reads cu_seqlens on the host).
Every measurement runs in a fresh subprocess (benchmarks/common.py), which also reports the
peak RSS growth of the call. Writes benchmarks/results/mom-cpu.md.

    python benchmarks/mom_cpu.py [--d-model 256] [--heads 4] [--lengths 1024 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from common import measure_in_subprocesses, peak_rss_mib, write_result

IMPLS = (
    "1 memory",
    "MoM",
    "1 memory fwd+bwd",
    "MoM fwd+bwd",
    "memory_attn masked",
    "memory_attn grouped",
)


def _worker(impl: str, T: int, args: argparse.Namespace) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    d_model, heads, repeats = args.d_model, args.heads, args.repeats
    from memzoo.kernels.mom import memory_attn, route
    from memzoo.models.mixers.mom import MixtureOfMemories

    torch.manual_seed(0)
    single = impl.startswith("1 memory")
    options = {"num_memories": 1, "topk": 1, "shared_memory": False} if single else {}
    layer = MixtureOfMemories(d_model, num_heads=heads, **options)

    def inputs(length: int) -> torch.Tensor:
        return torch.randn(1, length, d_model, generator=torch.Generator().manual_seed(0))

    if impl.startswith("memory_attn"):
        method = impl.split()[1]

        def prepare(x):
            # Random inputs of the MoM layer's shapes: every memory's k, v, g, the shared one
            # last and picked by every token.
            B, T, _ = x.shape
            M, H, dk, dv = layer.num_memories, heads, layer.key_dim, layer.value_dim
            generator = torch.Generator().manual_seed(1)
            q = torch.randn(B, T, H, dk, generator=generator)
            k = torch.randn(B, T, M + 1, H, dk, generator=generator)
            v = torch.randn(B, T, M + 1, H, dv, generator=generator)
            g = -torch.rand(B, T, M + 1, H, generator=generator) * 0.1
            weights, indices = route(torch.randn(B, T, M, generator=generator), layer.topk)
            indices = torch.cat([indices, indices.new_full((B, T, 1), M)], -1)
            weights = torch.cat([weights, weights.new_ones(B, T, 1)], -1)
            return q, k, v, g, weights, indices

        def run(tensors):
            with torch.inference_mode():
                memory_attn(*tensors, method=method)

    else:

        def prepare(x):
            return x

        def run(x):
            if impl.endswith("fwd+bwd"):
                layer.zero_grad(set_to_none=True)
                layer(x.requires_grad_()).sum().backward()
                x.grad = None
            else:
                with torch.inference_mode():
                    layer(x)

    run(prepare(inputs(64)))  # thread pools and kernels start here, not inside the measurement
    tensors = prepare(inputs(T))
    baseline = peak_rss_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(tensors)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "ms": sorted(times)[len(times) // 2],
        "peak_mib": peak_rss_mib() - baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "state": layer.state_size(T),
    }


def _measure(impl: str, T: int, args: argparse.Namespace) -> dict:
    def command(count: int) -> list[str]:
        return [
            sys.executable, __file__, "--worker", impl, "--lengths", str(T),
            "--d-model", str(args.d_model), "--heads", str(args.heads), "--repeats", str(count),
            "--threads", str(args.threads),
        ]  # fmt: skip

    return {"T": T, "impl": impl, **measure_in_subprocesses(command, args.repeats)}


def write_table(rows: list[dict], args: argparse.Namespace, command: str) -> Path:
    by_key = {(r["T"], r["impl"]): r for r in rows}
    baseline = {"MoM": "1 memory", "MoM fwd+bwd": "1 memory fwd+bwd"}
    lines = [
        f"# MoM layer on CPU {platform.machine()} ({rows[0]['threads']} threads)",
        "",
        f"B=1, d_model={args.d_model}, H={args.heads}, dk=d/(2H), dv=d/H, fp32; MoM: 4 memories, "
        "top-2, a shared memory; 1 memory: the same layer with one memory, top-1, no shared "
        f"memory. Median of {args.repeats} runs; torch {rows[0]['torch']}. Memory: peak RSS "
        "growth during the call in a fresh process (default allocator / glibc mmap threshold "
        "pinned at 64 KiB). 'memory_attn' rows time the memories' attention alone at the "
        f"MoM layer's shapes. Command: `{command}`",
        "",
        "| T | implementation | state (floats) | time (ms) | / 1 memory | peak memory (MiB) "
        "| peak, 64 KiB mmap threshold (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = baseline.get(r["impl"])
        ratio = f"{r['ms'] / by_key[(r['T'], base)]['ms']:.2f}x" if base else ""
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['state']} | {r['ms']:.1f} | {ratio} "
            f"| {r['peak_mib']:.1f} | {r['peak_mmap_mib']:.1f} |"
        )
    return write_result("mom-cpu.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = _worker(args.worker, args.lengths[0], args)
        print(json.dumps(result))
        return

    command = (
        f"python benchmarks/mom_cpu.py --d-model {args.d_model} --heads {args.heads} "
        f"--lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats} "
        f"--threads {args.threads}"
    )
    print(command)
    rows = []
    for T in args.lengths:
        for impl in IMPLS:
            row = _measure(impl, T, args)
            rows.append(row)
            print(f"T={T:>5} {impl:<20} {row['ms']:9.1f} ms  peak {row['peak_mib']:7.1f} MiB")
    print(f"wrote {write_table(rows, args, command)}")


if __name__ == "__main__":
    main()
