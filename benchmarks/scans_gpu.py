"""GPU timings of the state-space scans: Mamba-1 selective scan and Mamba-2 SSD.

Forward and forward+backward, bf16, T in {2k, 4k, 8k, 16k}: memzoo's Triton selective_scan
(Dm=1536, N=16) against mamba-ssm's selective_scan_fn, and memzoo's ssd (H=24, P=64, N=64)
against mamba-ssm's mamba_chunk_scan_combined, flash-linear-attention's chunk_simple_gla (the
same scalar-decay recurrence) and memzoo's own linear_attn at the same shape; mamba-ssm and fla
rows appear when they are installed (or from a source tree on PYTHONPATH: its SSD is Triton
code, and its selective scan needs only `selective_scan_cuda` built beside it). Writes
benchmarks/results/scans-<gpu>.md.

    python benchmarks/scans_gpu.py [--batch 2] [--lengths 2048 4096 8192 16384]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    cuda_time_ms,
    cuda_time_or_refusal,
    from_mamba_ssm,
    ms_cell,
    slug,
    write_result,
)

from memzoo.kernels import linear_attn, selective_scan, ssd


def _selective_scan_inputs(batch, T, Dm=1536, N=16):
    cuda = {"device": "cuda"}
    return {
        "u": torch.randn(batch, T, Dm, dtype=torch.bfloat16, **cuda),
        "delta": torch.randn(batch, T, Dm, dtype=torch.bfloat16, **cuda),
        "A": -torch.rand(Dm, N, **cuda) - 0.1,
        "B": torch.randn(batch, T, 1, N, dtype=torch.bfloat16, **cuda),
        "C": torch.randn(batch, T, 1, N, dtype=torch.bfloat16, **cuda),
        "D": torch.randn(Dm, **cuda),
        "z": torch.randn(batch, T, Dm, dtype=torch.bfloat16, **cuda),
        "delta_bias": torch.randn(Dm, **cuda) * 0.1,
    }


def _ssd_inputs(batch, T, H=24, P=64, N=64):
    cuda = {"device": "cuda"}
    return {
        "x": torch.randn(batch, T, H, P, dtype=torch.bfloat16, **cuda),
        "dt": torch.randn(batch, T, H, **cuda),
        "A": -torch.rand(H, **cuda) - 0.1,
        "B": torch.randn(batch, T, 1, N, dtype=torch.bfloat16, **cuda),
        "C": torch.randn(batch, T, 1, N, dtype=torch.bfloat16, **cuda),
    }


def _implementations() -> dict:
    """name -> (make inputs, fn(inputs) -> output)."""

    def memzoo_scan(t):
        return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                              delta_bias=t["delta_bias"], delta_softplus=True)[0]  # fmt: skip

    def memzoo_ssd(t):
        return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"])[0]

    def memzoo_linear_attn(t):
        H = t["x"].shape[2]
        q = t["C"].expand(-1, -1, H, -1)
        k = t["B"].expand(-1, -1, H, -1)
        g = F.softplus(t["dt"]) * t["A"]
        return linear_attn(q, k, t["x"], g=g, scale=1.0)[0]

    impls = {
        "memzoo selective_scan": (_selective_scan_inputs, memzoo_scan),
        "memzoo ssd": (_ssd_inputs, memzoo_ssd),
        "memzoo linear_attn (SSD shape)": (_ssd_inputs, memzoo_linear_attn),
    }
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_simple_gla(t):  # fla wants B and C per head: the expansion is timed too
            H = t["x"].shape[2]
            q = t["C"].expand(-1, -1, H, -1).contiguous()
            k = t["B"].expand(-1, -1, H, -1).contiguous()
            g = F.softplus(t["dt"]) * t["A"]
            return chunk_simple_gla(q=q, k=k, v=t["x"], g=g, scale=1.0)[0]

        impls["fla chunk_simple_gla (SSD shape)"] = (_ssd_inputs, fla_simple_gla)
    except ImportError:
        pass
    selective_scan_fn = from_mamba_ssm(
        "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"
    )
    if selective_scan_fn is not None:

        def mamba_scan(t):  # mamba-ssm is channel-major: [B, D, L] and [B, G, N, L]
            return selective_scan_fn(
                t["u"].transpose(1, 2), t["delta"].transpose(1, 2), t["A"],
                t["B"].permute(0, 2, 3, 1), t["C"].permute(0, 2, 3, 1), t["D"],
                z=t["z"].transpose(1, 2), delta_bias=t["delta_bias"], delta_softplus=True,
            )  # fmt: skip

        impls["mamba-ssm selective_scan_fn"] = (_selective_scan_inputs, mamba_scan)
    mamba_chunk_scan_combined = from_mamba_ssm(
        "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"
    )
    if mamba_chunk_scan_combined is not None:

        def mamba_ssd(t):
            return mamba_chunk_scan_combined(
                t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=64, dt_softplus=True
            )

        impls["mamba-ssm mamba_chunk_scan_combined"] = (_ssd_inputs, mamba_ssd)
    return impls


def _measure(fn, inputs, repeats: int) -> tuple[float, float | str]:
    leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}
    forward = cuda_time_ms(lambda: fn(inputs), repeats)
    both = cuda_time_or_refusal(lambda: fn(leaves).float().sum().backward(), repeats)
    return forward, both


def run(args) -> list[dict]:
    rows = []
    for T in args.lengths:
        for name, (make, fn) in _implementations().items():
            fwd, both = _measure(fn, make(args.batch, T), args.repeats)
            rows.append({"T": T, "impl": name, "fwd": fwd, "fwd_bwd": both})
            print(f"T={T:>6} {name:<36} fwd {fwd:8.3f} ms  fwd+bwd {ms_cell(both)}", flush=True)
    return rows


def write_table(rows, args):
    device = torch.cuda.get_device_name(0)
    lines = [
        f"# state-space scans on {device}",
        "",
        f"B={args.batch}, bf16; selective scan Dm=1536 N=16 (Mamba's call: bias + softplus, "
        f"D, z); SSD and linear_attn H=24 P=64 N=64; median of {args.repeats} runs; "
        f"torch {torch.__version__}.",
        "",
        "| T | implementation | fwd (ms) | fwd+bwd (ms) |",
        "|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {r['impl']} | {r['fwd']:.3f} | {ms_cell(r['fwd_bwd'])} |")
    return write_result(f"scans-{slug(device)}.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("scans_gpu.py needs a CUDA device; see benchmarks/selective_scan_cpu.py for CPU")
        return
    print(f"wrote {write_table(run(args), args)}")


if __name__ == "__main__":
    main()
