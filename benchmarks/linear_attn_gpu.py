"""GPU timings of chunked gated linear attention against softmax attention and fla.

Forward and forward+backward at B=8, H=16, K=V=64, bf16, T in {2048, 8192}: memzoo's Triton
kernels (with and without decay), torch SDPA (flash backend, causal), and
flash-linear-attention's chunk kernels when installed. Writes
benchmarks/results/linear_attn-<gpu>.md with times and ratios to SDPA.

    python benchmarks/linear_attn_gpu.py [--batch 8] [--heads 16] [--dim 64] [--lengths 2048 8192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cuda_time_ms, cuda_time_or_refusal, ms_cell, write_result

from memzoo.kernels import linear_attn


def _implementations():
    """name -> fn(q, k, v, g) -> o, all on [B, T, H, D] tensors."""

    def sdpa(q, k, v, g):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        return o.transpose(1, 2)

    impls = {
        "torch SDPA (flash)": sdpa,
        "memzoo linear_attn": lambda q, k, v, g: linear_attn(q, k, v)[0],
        "memzoo linear_attn + decay": lambda q, k, v, g: linear_attn(q, k, v, g=g)[0],
    }
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla

        impls["fla chunk_linear_attn"] = lambda q, k, v, g: chunk_linear_attn(
            q, k, v, normalize=False
        )[0]
        impls["fla chunk_simple_gla"] = lambda q, k, v, g: chunk_simple_gla(q=q, k=k, v=v, g=g)[0]
    except ImportError:
        pass
    return impls


def _time_impl(fn, inputs, leaves, repeats: int) -> tuple[float, float | str]:
    """(forward ms, forward+backward ms or the baseline's refusal) of fn(q, k, v, g)."""
    forward = cuda_time_ms(lambda: fn(*inputs), repeats)
    both = cuda_time_or_refusal(lambda: fn(*leaves, inputs[3]).float().sum().backward(), repeats)
    return forward, both


def run(args) -> list[dict]:
    rows = []
    B, H, D = args.batch, args.heads, args.dim
    for T in args.lengths:
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = -torch.rand(B, T, H, device="cuda", dtype=torch.float32) * 0.1
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        for name, fn in _implementations().items():
            fwd, both = _time_impl(fn, (q, k, v, g), leaves, args.repeats)
            rows.append({"T": T, "impl": name, "fwd": fwd, "fwd_bwd": both})
            print(f"T={T:>6} {name:<28} fwd {fwd:8.3f} ms  fwd+bwd {ms_cell(both)}", flush=True)
    return rows


def write_table(rows, args) -> Path:
    device = torch.cuda.get_device_name(0)
    sdpa = {r["T"]: r for r in rows if r["impl"].startswith("torch SDPA")}
    lines = [
        f"# linear attention on {device}",
        "",
        f"B={args.batch}, H={args.heads}, K=V={args.dim}, bf16, causal; median of "
        f"{args.repeats} runs; torch {torch.__version__}. Ratios are to SDPA at the same T "
        "(< 1 is faster).",
        "",
        "| T | implementation | fwd (ms) | fwd+bwd (ms) | fwd ratio | fwd+bwd ratio |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = sdpa[r["T"]]
        both = r["fwd_bwd"]
        both_ratio = f"{both / base['fwd_bwd']:.2f}" if isinstance(both, float) else ""
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['fwd']:.3f} | {ms_cell(both)} | "
            f"{r['fwd'] / base['fwd']:.2f} | {both_ratio} |"
        )
    path = write_result(f"linear_attn-{device.lower().replace(' ', '-')}.md", lines)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("linear_attn_gpu.py needs a CUDA device; see benchmarks/linear_attn_cpu.py for CPU")
        return
    print(f"wrote {write_table(run(args), args)}")


if __name__ == "__main__":
    main()
