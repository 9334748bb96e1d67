"""CPU time and peak memory of the Mamba-1 selective scan: the chunked path vs token by token.

With `--call mamba` (the default) the inputs are a Mamba block's: softplus(delta + delta_bias),
A = -exp(A_log) with S4D-real values (-1 .. -N), B and C shared by all channels (G = 1), the D
skip, the silu(z) gate and the final state. `--call bare` times the plain call
`selective_scan(u, delta, A, B, C)`, with the same A, B and C and delta already the positive
step (softplus(delta + delta_bias) computed once, outside the timing), and writes
selective_scan-cpu-bare.md.

The forward times of the chunked path and of the recurrence come from fresh processes
(--rounds) that each alternate between them, so that a noisy machine slows both alike and each
process's ratio holds; the speed-up is the median of those ratios, taken once from each
process's median times and once from its fastest runs (interference only adds time, and a busy
neighbour slows the two-thread chunked path more than the one-thread recurrence, so the fastest
runs come nearest the code's own speed, the medians tell the machine's). Memory is measured in
further fresh processes, one per implementation, which allocate their inputs, record their peak
RSS (ru_maxrss) as the baseline, then run: the memory columns are the growth of the peak above
that baseline, under the default allocator and again (in another fresh process, one run) with
glibc's mmap threshold pinned at 64 KiB, so that every buffer of 64 KiB or more is its own
mapping, returned on free: what the algorithm holds at its peak. Forward rows run under
torch.inference_mode(); "chunk fwd+bwd" backpropagates through the chunked path (the CPU
training path), timed in its own process.
Writes benchmarks/results/selective_scan-cpu.md.

    python benchmarks/selective_scan_cpu.py [--dim 512] [--state 16] [--lengths 4096]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from common import measure_in_subprocesses, peak_rss_mib, write_result

IMPLS = ("chunk", "recurrent", "chunk fwd+bwd")
FORWARD_PAIR = "forward pair"  # the worker that times "chunk" and "recurrent" side by side
CALLS = {
    "mamba": "with delta_bias + softplus, D, z and the final state",
    "bare": "the plain call selective_scan(u, delta, A, B, C): delta the positive step, "
    "no softplus, D, z or final state",
}


def _worker(impl: str, T: int, args: argparse.Namespace) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch

    from memzoo.kernels.selective_scan.reference import (
        _default_chunk_size,
        release_kept_workspace,
        selective_scan_chunk_ref,
        selective_scan_recurrent_ref,
    )

    Bsz, Dm, N = args.batch, args.dim, args.state
    bare = args.call == "bare"
    flags = {} if bare else {"delta_softplus": True, "output_final_state": True}

    def inputs(length: int) -> dict:
        generator = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=generator)

        dt_init = torch.empty(Dm).uniform_(-6.9, -2.3, generator=generator)
        block = {
            "u": randn(Bsz, length, Dm),
            "delta": randn(Bsz, length, Dm),
            "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(Dm, 1),
            "B": randn(Bsz, length, 1, N),
            "C": randn(Bsz, length, 1, N),
            "D": randn(Dm),
            "z": None if bare else randn(Bsz, length, Dm),
            # Mamba's dt init: softplus(bias) log-uniform in [1e-3, 1e-1].
            "delta_bias": torch.expm1(dt_init.exp()).log(),
        }
        if not bare:
            return block
        # In place and without z: no freed transient raises the peak the memory columns
        # count from.
        step = block.pop("delta").add_(block.pop("delta_bias"))
        torch.ops.aten.softplus.out(step, 1, 20, out=step)
        return {"u": block["u"], "delta": step, **{n: block[n] for n in ("A", "B", "C")}}

    def run(name: str, tensors: dict) -> None:
        form = selective_scan_recurrent_ref if name == "recurrent" else selective_scan_chunk_ref
        if name == "chunk fwd+bwd":
            leaves = {k: t.requires_grad_() for k, t in tensors.items()}
            y, state = form(**leaves, **flags)
            (y.sum() if state is None else y.sum() + state.sum()).backward()
            for t in leaves.values():
                t.grad = None
        else:
            with torch.inference_mode():
                form(**tensors, **flags)

    def timed(name: str, tensors: dict) -> float:
        start = time.perf_counter()
        run(name, tensors)
        return (time.perf_counter() - start) * 1e3

    defaults = inspect.signature(selective_scan_chunk_ref).parameters
    row = {
        "chunk_size": defaults["chunk_size"].default,
        "chunk_tokens": defaults["chunk_size"].default
        or _default_chunk_size(Bsz * Dm * N, 4, autograd=impl == "chunk fwd+bwd"),
        "block_size": defaults["block_size"].default,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    names = ("chunk", "recurrent") if impl == FORWARD_PAIR else (impl,)
    for name in names:
        run(name, inputs(64))  # thread pools and kernels start here, not inside the measurement
    # The warm-up left its workspace with this thread: free it before the peak memory's
    # baseline, so that the measured call makes its own, as a fresh process's first call does.
    release_kept_workspace()
    tensors = inputs(T)
    if impl == FORWARD_PAIR:
        # A recurrent call after every `every` chunk calls, interleaved to the end.
        every = max(1, args.repeats // args.recurrent_repeats)
        times = {"chunk": [], "recurrent": []}
        for i in range(args.repeats):
            times["chunk"].append(timed("chunk", tensors))
            if i % every == every - 1 and len(times["recurrent"]) < args.recurrent_repeats:
                times["recurrent"].append(timed("recurrent", tensors))
        return {
            **row,
            **{f"{name}_ms": _median(ts) for name, ts in times.items()},
            **{f"{name}_best_ms": min(ts) for name, ts in times.items()},
        }
    baseline = peak_rss_mib()
    times = [timed(impl, tensors) for _ in range(args.repeats)]
    return {**row, "ms": _median(times), "peak_mib": peak_rss_mib() - baseline}


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _command(impl: str, T: int, args: argparse.Namespace, repeats: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--lengths",
        str(T),
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--state",
        str(args.state),
        "--repeats",
        str(repeats),
        "--recurrent-repeats",
        str(args.recurrent_repeats),
        "--call",
        args.call,
    ]


def _measure(T: int, args: argparse.Namespace) -> list[dict]:
    """The rows of one length: times from `args.rounds` processes (medians of their medians;
    the speed-up is the median of each forward process's own ratio, with its range), memory
    from one process per impl."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def rounds(impl: str, count: int) -> list[dict]:
        command = _command(impl, T, args, args.repeats)
        return [
            json.loads(
                subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            )
            for _ in range(count)
        ]

    pairs = rounds(FORWARD_PAIR, args.rounds)
    ratios = [p["recurrent_ms"] / p["chunk_ms"] for p in pairs]
    # Interference only ever adds time: each process's fastest runs are its quietest.
    best_ratios = [p["recurrent_best_ms"] / p["chunk_best_ms"] for p in pairs]
    rows = []
    for impl in IMPLS:
        # Forward rows only need the memory here: one call each.
        repeats = args.repeats if impl == "chunk fwd+bwd" else 1
        row = measure_in_subprocesses(partial(_command, impl, T, args), repeats)
        if impl == "chunk fwd+bwd":  # one process's time is at the mercy of a busy spell
            more = rounds(impl, args.rounds - 1)
            row["ms"] = _median([row["ms"]] + [r["ms"] for r in more])
        else:
            row["ms"] = _median([p[f"{impl}_ms"] for p in pairs])
        if impl == "chunk":
            row["speedup"] = (_median(ratios), min(ratios), max(ratios))
            row["best_speedup"] = (_median(best_ratios), min(best_ratios), max(best_ratios))
            row["ratios"], row["best_ratios"] = sorted(ratios), sorted(best_ratios)
        rows.append({"T": T, "impl": impl, **row})
    return rows


def write_table(rows: list[dict], args: argparse.Namespace, command: str) -> Path:
    block = rows[0]["block_size"]
    block = "block_size=None: a token loop" if block is None else f"block_size={block}"
    autograd_tokens = next(r["chunk_tokens"] for r in rows if r["impl"] == "chunk fwd+bwd")
    lines = [
        f"# selective_scan on CPU {platform.machine()} ({rows[0]['threads']} threads)",
        "",
        f"B={args.batch}, Dm={args.dim}, N={args.state}, G=1, fp32, {CALLS[args.call]}; "
        f"torch {rows[0]['torch']}. Forward times: {args.rounds} fresh "
        f"processes, each the median of {args.repeats} runs ({args.recurrent_repeats} for the "
        "recurrence, alternating with the chunked calls in the same process, so that a busy "
        "machine slows both alike); the table gives the median over processes, and the "
        "speed-up is the median of each process's own ratio of medians, [min-max] over "
        "processes; the last column takes each process's ratio of its fastest runs instead "
        "(interference only adds time, so these are its quietest moments). "
        f"'chunk' is the CPU path (`selective_scan_chunk_ref`, chunk_size="
        f"{rows[0]['chunk_size']}: chunks of {rows[0]['chunk_tokens']} tokens at this width, "
        f"{autograd_tokens} with autograd, "
        f"{block}), 'recurrent' the token-by-token oracle "
        "(`selective_scan_recurrent_ref`). Memory: peak RSS growth during the call, measured "
        "in a fresh process after the inputs are allocated, under the default allocator and "
        "with glibc's mmap threshold pinned at 64 KiB (no heap fragmentation: what the "
        "algorithm holds). "
        "Forward rows run under inference_mode; 'chunk fwd+bwd' is forward plus backward "
        "through autograd: with the default block size, the token loop's own backward, which "
        "recomputes each chunk's states from its entering state; its time is the median over "
        f"{args.rounds} fresh processes, each the median of {args.repeats} runs. "
        f"Command: `{command}`",
        "",
        "| T | implementation | time (ms) | peak memory (MiB) | peak, 64 KiB mmap threshold "
        "(MiB) | recurrence time / this | same, fastest runs |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedups = ["1.0x", "1.0x"] if r["impl"] == "recurrent" else ["", ""]
        for i, key in enumerate(("speedup", "best_speedup")):
            if key in r:
                mid, low, high = r[key]
                speedups[i] = f"{mid:.1f}x [{low:.1f}-{high:.1f}]"
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['ms']:.1f} | {r['peak_mib']:.1f} "
            f"| {r['peak_mmap_mib']:.1f} | {speedups[0]} | {speedups[1]} |"
        )
    lines += ["", "Each process's speed-up (recurrence time / chunk time), sorted:", ""]
    for r in rows:
        if "ratios" in r:
            for key, label in (("ratios", "medians"), ("best_ratios", "fastest runs")):
                values = " ".join(f"{v:.1f}" for v in r[key])
                lines.append(f"- T={r['T']}, {label}: {values}")
    name = "selective_scan-cpu.md" if args.call == "mamba" else f"selective_scan-cpu-{args.call}.md"
    return write_result(name, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--recurrent-repeats", type=int, default=7)
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes that time the forward pair"
    )
    parser.add_argument(
        "--call",
        choices=list(CALLS),
        default="mamba",
        help="mamba: a Mamba block's call (softplus, D, z, final state); bare: the plain scan",
    )
    parser.add_argument("--worker", choices=(*IMPLS, FORWARD_PAIR), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.lengths[0], args)))
        return

    command = (
        f"python benchmarks/selective_scan_cpu.py --batch {args.batch} --dim {args.dim} "
        f"--state {args.state} --lengths {' '.join(map(str, args.lengths))} "
        f"--repeats {args.repeats} --recurrent-repeats {args.recurrent_repeats} "
        f"--rounds {args.rounds}" + ("" if args.call == "mamba" else f" --call {args.call}")
    )
    print(command)
    rows = []
    for T in args.lengths:
        for row in _measure(T, args):
            rows.append(row)
            print(
                f"T={T:>5} {row['impl']:<14} {row['ms']:9.1f} ms  peak {row['peak_mib']:7.1f} MiB "
                f"({row['peak_mmap_mib']:.1f} MiB with a 64 KiB mmap threshold)"
            )
            for key in ("speedup", "best_speedup"):
                if key in row:
                    mid, low, high = row[key]
                    print(f"        {key}: {mid:.1f}x [{low:.1f}-{high:.1f}]")
    print(f"wrote {write_table(rows, args, command)}")


if __name__ == "__main__":
    main()
