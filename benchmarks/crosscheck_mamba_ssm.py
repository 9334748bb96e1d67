"""memzoo's selective_scan and ssd against mamba-ssm's own pure-torch references, on CPU.

mamba-ssm is a CUDA source package that CI cannot install, so this is a script, not a test: it
needs mamba-ssm's Python sources importable (an install, or an unbuilt source tree on
PYTHONPATH; its CUDA extension is never called). It compares, in relative L2 error:
- `selective_scan` (torch path in fp64, Triton path in fp32) with `selective_scan_ref` (which
  computes in fp32), with G=2 groups, D, z, delta_bias + softplus and the final state;
- `selective_state_update` (torch path in fp64, Triton path in fp32) with mamba-ssm's
  `selective_state_update_ref`, one decode step with the same options;
- `ssd` (fp64) with `ssd_minimal_discrete` from the Mamba-2 paper's code, and the final state.

    PYTHONPATH=.:path/to/mamba-ssm-sources TRITON_INTERPRET=1 \
        python benchmarks/crosscheck_mamba_ssm.py
"""

from __future__ import annotations

import sys
import types

import torch
from common import package_without_init


def _import_references():
    """(selective_scan_ref, selective_state_update_ref, ssd_minimal_discrete), importing
    mamba-ssm without its extension: its package __init__ and selective_scan_interface import
    the CUDA `selective_scan_cuda`."""
    if not package_without_init("mamba_ssm"):
        sys.exit("mamba-ssm's sources are not importable: put them on PYTHONPATH")
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    return selective_scan_ref, selective_state_update_ref, ssd_minimal_discrete


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_selective_scan(selective_scan_ref) -> None:
    from memzoo.kernels import selective_scan

    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    Bsz, T, Dm, N, G = 2, 100, 12, 4, 2
    u, delta, z = randn(Bsz, T, Dm), randn(Bsz, T, Dm), randn(Bsz, T, Dm)
    A = -torch.rand(Dm, N, generator=generator, dtype=torch.float64) * 3 - 0.1
    B, C = randn(Bsz, T, G, N), randn(Bsz, T, G, N)
    D, bias = randn(Dm), randn(Dm)
    # mamba-ssm is channel-major ([B, D, L], [B, G, N, L]) and computes in fp32.
    ref, ref_state = selective_scan_ref(
        u.transpose(1, 2), delta.transpose(1, 2), A.float(), B.permute(0, 2, 3, 1),
        C.permute(0, 2, 3, 1), D=D.float(), z=z.transpose(1, 2), delta_bias=bias,
        delta_softplus=True, return_last_state=True,
    )  # fmt: skip
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        args = [t.to(dtype) for t in (u, delta, A, B, C)]
        y, state = selective_scan(
            *args, D=D.to(dtype), z=z.to(dtype), delta_bias=bias.to(dtype),
            delta_softplus=True, output_final_state=True, backend=backend,
        )  # fmt: skip
        print(
            f"selective_scan ({backend}, {str(dtype)[6:]}) vs selective_scan_ref: "
            f"y {_rel(y, ref.transpose(1, 2)):.1e}, final state {_rel(state, ref_state):.1e}"
        )


def check_state_update(selective_state_update_ref) -> None:
    from memzoo.kernels import selective_state_update

    generator = torch.Generator().manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    Bsz, Dm, N, G = 3, 12, 4, 1  # mamba-ssm groups heads, not channels: one group here
    u, delta, z, state = randn(Bsz, Dm), randn(Bsz, Dm), randn(Bsz, Dm), randn(Bsz, Dm, N)
    A = -torch.rand(Dm, N, generator=generator, dtype=torch.float64) * 3 - 0.1
    B, C, D, bias = randn(Bsz, G, N), randn(Bsz, G, N), randn(Dm), randn(Dm)
    # mamba-ssm's step updates `state` in place.
    ref_state = state.clone()
    ref = selective_state_update_ref(
        ref_state, u, delta, A, B, C, D=D, z=z, dt_bias=bias, dt_softplus=True
    )
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        args = [t.to(dtype) for t in (u, delta, A, B, C, state)]
        y, new_state = selective_state_update(
            *args, D=D.to(dtype), z=z.to(dtype), delta_bias=bias.to(dtype), delta_softplus=True,
            backend=backend,
        )  # fmt: skip
        errors = f"y {_rel(y, ref):.1e}, state {_rel(new_state, ref_state):.1e}"
        print(
            f"selective_state_update ({backend}, {str(dtype)[6:]}) vs "
            f"selective_state_update_ref: {errors}"
        )


def check_ssd(ssd_minimal_discrete) -> None:
    from memzoo.kernels import ssd

    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    Bsz, T, H, P, N = 2, 128, 4, 8, 6
    x, B, C = randn(Bsz, T, H, P), randn(Bsz, T, 1, N), randn(Bsz, T, 1, N)
    dt = torch.rand(Bsz, T, H, generator=generator, dtype=torch.float64) + 0.05
    A = -torch.rand(H, generator=generator, dtype=torch.float64) - 0.1
    # The paper's code takes the discretised inputs x dt and A dt, and B, C per head.
    ref, ref_state = ssd_minimal_discrete(
        x * dt[..., None], A * dt, B.expand(-1, -1, H, -1), C.expand(-1, -1, H, -1), 32
    )
    y, state = ssd(x, dt, A, B, C, dt_softplus=False, output_final_state=True)
    print(
        f"ssd (fp64) vs ssd_minimal_discrete: y {_rel(y, ref):.1e}, "
        f"final state {_rel(state, ref_state):.1e}"
    )


def main() -> None:
    selective_scan_ref, selective_state_update_ref, ssd_minimal_discrete = _import_references()
    check_selective_scan(selective_scan_ref)
    check_state_update(selective_state_update_ref)
    check_ssd(ssd_minimal_discrete)


if __name__ == "__main__":
    main()
