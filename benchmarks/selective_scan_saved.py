"""What the selective scan keeps for its backward: bytes per (token, channel) beyond the inputs.

A Mamba block's call (delta_bias + softplus, D, z, fp32 inputs) runs forward under
`torch.autograd.graph.saved_tensors_hooks`; every tensor autograd saves is counted once by its
storage, and the storages of the inputs themselves are left out: what the training path adds
to activation memory. The count does not depend on the device, so on a machine without a GPU
the Triton path runs in the interpreter (TRITON_INTERPRET=1, set here before triton loads).
Writes benchmarks/results/selective_scan-saved.md.

    python benchmarks/selective_scan_saved.py [--length 256] [--dim 64] [--state 16]
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import write_result  # noqa: E402

from memzoo.kernels.selective_scan import selective_scan  # noqa: E402


def saved_bytes(backend: str, T: int, Dm: int, N: int, device: str) -> int:
    """Bytes of the storages autograd saves in one forward, less the inputs' own."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, scale=1.0):
        t = torch.randn(*shape, generator=generator) * scale
        return t.to(device).requires_grad_()

    inputs = {
        "u": leaf(1, T, Dm),
        "delta": leaf(1, T, Dm),
        "A": (-torch.rand(Dm, N, generator=generator) - 0.5).to(device).requires_grad_(),
        "B": leaf(1, T, 1, N),
        "C": leaf(1, T, 1, N),
        "D": leaf(Dm),
        "z": leaf(1, T, Dm),
        "delta_bias": leaf(Dm, scale=0.1),
    }
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan(**inputs, delta_softplus=True, output_final_state=True, backend=backend)
    own = {t.untyped_storage().data_ptr() for t in inputs.values()}
    return sum(size for ptr, size in storages.items() if ptr not in own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--state", type=int, default=16)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    T, Dm, N = args.length, args.dim, args.state
    where = "a GPU" if device == "cuda" else "the CPU (Triton through its interpreter)"
    lines = [
        "# selective_scan: what the forward keeps for the backward",
        "",
        f"One sequence of T={T}, Dm={Dm}, N={N}, fp32, a Mamba block's call (delta_bias + "
        f"softplus, D, z, final state), on {where}; torch {torch.__version__}. Bytes of the "
        "storages autograd saves, each counted once, less the inputs' own, per token and "
        "channel. Command: `python benchmarks/selective_scan_saved.py --length "
        f"{T} --dim {Dm} --state {N}`",
        "",
        "| backend | saved beyond the inputs (bytes) | per token and channel |",
        "|---|---:|---:|",
    ]
    for backend in ("torch", "triton"):
        size = saved_bytes(backend, T, Dm, N, device)
        per = size / (T * Dm)
        print(f"{backend:<7} {size:>10} bytes  {per:5.1f} per token and channel")
        lines.append(f"| {backend} | {size} | {per:.1f} |")
    print(f"wrote {write_result('selective_scan-saved.md', lines)}")


if __name__ == "__main__":
    main()
