"""GPU timings of memzoo's Triton attention (causal and sliding window) vs SDPA and flash-attn.

Forward and forward+backward, bf16, T in {2k, 4k, 8k, 16k}; flash-attn rows appear when the
package is installed. Writes benchmarks/results/attention-<gpu>.md with ratios to SDPA.

    python benchmarks/attention_gpu.py [--batch 4] [--heads 16] [--dim 64] [--window 512]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cuda_time_ms, slug, write_result

from memzoo.kernels import attention


def _implementations(window: int) -> dict:
    """name -> fn(q, k, v) -> o on [B, T, H, D] tensors."""

    def sdpa(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        return o.transpose(1, 2)

    impls = {
        "torch SDPA (flash), causal": sdpa,
        "memzoo triton, causal": lambda q, k, v: attention(q, k, v, backend="triton"),
        f"memzoo triton, window {window}": lambda q, k, v: attention(
            q, k, v, window=window, backend="triton"
        ),
    }
    try:
        from flash_attn import flash_attn_func

        impls["flash-attn, causal"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
        impls[f"flash-attn, window {window}"] = lambda q, k, v: flash_attn_func(
            q, k, v, causal=True, window_size=(window - 1, 0)
        )
    except ImportError:
        pass
    return impls


def _measure(fn, inputs, repeats: int) -> tuple[float, float]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    forward = cuda_time_ms(lambda: fn(*inputs), repeats)
    both = cuda_time_ms(lambda: fn(*leaves).float().sum().backward(), repeats)
    return forward, both


def run(args) -> list[dict]:
    rows = []
    for T in args.lengths:
        shape = (args.batch, T, args.heads, args.dim)
        inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for name, fn in _implementations(args.window).items():
            fwd, both = _measure(fn, inputs, args.repeats)
            rows.append({"T": T, "impl": name, "fwd": fwd, "fwd_bwd": both})
            print(f"T={T:>6} {name:<32} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms", flush=True)
    return rows


def write_table(rows, args):
    device = torch.cuda.get_device_name(0)
    sdpa = {r["T"]: r for r in rows if r["impl"].startswith("torch SDPA")}
    lines = [
        f"# attention on {device}",
        "",
        f"B={args.batch}, H={args.heads}, D={args.dim}, bf16; median of {args.repeats} runs; "
        f"torch {torch.__version__}. Ratios are to causal SDPA at the same T (< 1 is faster).",
        "",
        "| T | implementation | fwd (ms) | fwd+bwd (ms) | fwd ratio | fwd+bwd ratio |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = sdpa[r["T"]]
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['fwd']:.3f} | {r['fwd_bwd']:.3f} | "
            f"{r['fwd'] / base['fwd']:.2f} | {r['fwd_bwd'] / base['fwd_bwd']:.2f} |"
        )
    return write_result(f"attention-{slug(device)}.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA device; see benchmarks/attention_cpu.py for CPU")
        return
    print(f"wrote {write_table(run(args), args)}")


if __name__ == "__main__":
    main()
