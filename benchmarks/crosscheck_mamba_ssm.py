"""memzoo's selective_scan and ssd against mamba-ssm's own references and Triton kernels, on CPU.

mamba-ssm is a CUDA source package that CI cannot install, so this is a script, not a test: it
needs mamba-ssm's Python sources importable (an install, or an unbuilt source tree on
PYTHONPATH; its CUDA extension is never called). It compares, in relative L2 error:
- `selective_scan` (torch path in fp64, Triton path in fp32) with `selective_scan_ref` (which
  computes in fp32), with G=2 groups, D, z, delta_bias + softplus and the final state;
- `selective_state_update` (torch path in fp64, Triton path in fp32) with mamba-ssm's
  `selective_state_update_ref` and with its Triton `selective_state_update` (fp32), one decode
  step with the same options;
- `ssd` (fp64) with `ssd_minimal_discrete` from the Mamba-2 paper's code, and the final state;
- `ssd` (torch path in fp64, Triton path in fp32) with mamba-ssm's Triton Mamba-2 kernels,
  `mamba_chunk_scan_combined` in fp32: output, final state and every gradient, with G=2
  groups, D, z, dt_bias + softplus and an initial state; and packed sequences (cu_seqlens),
  output and each sequence's final state.

mamba-ssm's Triton kernels run on CPU tensors under the Triton interpreter: three shims stand
in for what they ask of a GPU (`_run_mamba_triton_on_cpu`). Nothing is timed; about 25 s.

    PYTHONPATH=.:path/to/mamba-ssm-sources TRITON_INTERPRET=1 \
        python benchmarks/crosscheck_mamba_ssm.py
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch
from common import package_without_init

from memzoo.kernels._core import interpreter_enabled
from memzoo.kernels.testing import cu_seqlens_from_lengths, relative_rmse


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


def _run_mamba_triton_on_cpu() -> None:
    """Let mamba-ssm's Triton kernels run on CPU tensors under the interpreter.

    They enter `torch.cuda.device(x.device.index)` (None on CPU), read the GPU's multiprocessor
    count to size a grid, and autotune over configs, which the interpreter cannot time: the
    device context becomes a no-op, the count a small stand-in, and every autotuner keeps its
    first config. Only the launch grid and the tile shapes change, never the math.
    """
    from triton.runtime.autotuner import Autotuner

    torch.cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *args, **kwargs: types.SimpleNamespace(
        multi_processor_count=4
    )
    modules = ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined")
    for name in (*modules, "selective_state_update"):
        module = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                value.configs = value.configs[:1]


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
            f"y {relative_rmse(ref.transpose(1, 2), y):.1e}, "
            f"final state {relative_rmse(ref_state, state):.1e}"
        )


def check_state_update(selective_state_update_ref, selective_state_update_triton) -> None:
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
        errors = f"y {relative_rmse(ref, y):.1e}, state {relative_rmse(ref_state, new_state):.1e}"
        print(
            f"selective_state_update ({backend}, {str(dtype)[6:]}) vs "
            f"selective_state_update_ref: {errors}"
        )
    mamba_state = state.float()
    mamba_y = selective_state_update_triton(
        mamba_state, *(t.float() for t in (u, delta, A, B, C)), D=D.float(), z=z.float(),
        dt_bias=bias.float(), dt_softplus=True,
    )  # fmt: skip
    print(
        "mamba-ssm's Triton selective_state_update (fp32) vs selective_state_update_ref: "
        f"y {relative_rmse(ref, mamba_y):.1e}, state {relative_rmse(ref_state, mamba_state):.1e}"
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
        f"ssd (fp64) vs ssd_minimal_discrete: y {relative_rmse(ref, y):.1e}, "
        f"final state {relative_rmse(ref_state, state):.1e}"
    )


def _values_and_grads(fn, inputs, grad_outputs, dtype):
    """fn's outputs and the gradients of sum(out * grad_out) with respect to every input, all
    computed in `dtype` from fresh leaves."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    loss = sum((out * g.to(dtype)).sum() for out, g in zip(outputs, grad_outputs, strict=True))
    loss.backward()
    return [*outputs, *(t.grad for t in leaves)]


def _report(title: str, names: list[str], values: list, refs: list) -> None:
    errors = ", ".join(
        f"{name} {relative_rmse(r, v):.1e}" for name, v, r in zip(names, values, refs, strict=True)
    )
    print(f"{title}: {errors}")


def check_chunk_scan(mamba_chunk_scan_combined) -> None:
    """memzoo's ssd and mamba-ssm's Triton Mamba-2 kernels, forward and every gradient."""
    from memzoo.kernels import ssd

    generator = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # T = 70: two full chunks of 32 and a ragged one.
    Bsz, T, H, P, G, N = 2, 70, 4, 8, 2, 16
    x, z, dt = randn(Bsz, T, H, P), randn(Bsz, T, H, P), randn(Bsz, T, H)
    B, C = randn(Bsz, T, G, N), randn(Bsz, T, G, N)
    A = -torch.rand(H, generator=generator, dtype=torch.float64) - 0.5
    D, dt_bias, h0 = randn(H), randn(H) * 0.3, randn(Bsz, H, P, N)
    inputs = [x, dt, A, B, C, D, z, dt_bias, h0]
    grad_outputs = [randn(Bsz, T, H, P), randn(Bsz, H, P, N)]
    names = "y, final state, dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state".split(", ")

    def mamba(x, dt, A, B, C, D, z, dt_bias, h0):
        return mamba_chunk_scan_combined(
            x, dt, A, B, C, 32, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
            dt_softplus=True, return_final_states=True,
        )  # fmt: skip

    ref = _values_and_grads(mamba, inputs, grad_outputs, torch.float32)
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):

        def memzoo(x, dt, A, B, C, D, z, dt_bias, h0, backend=backend):
            return ssd(
                x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_state=h0,
                output_final_state=True, backend=backend,
            )  # fmt: skip

        values = _values_and_grads(memzoo, inputs, grad_outputs, dtype)
        title = f"ssd ({backend}, {str(dtype)[6:]}) vs mamba_chunk_scan_combined (fp32)"
        _report(title, names, values, ref)


def check_chunk_scan_varlen(mamba_chunk_scan_combined) -> None:
    """Packed sequences: memzoo's cu_seqlens against mamba-ssm's seq_idx (and its cu_seqlens
    for each sequence's final state, which it returns without a backward)."""
    from memzoo.kernels import ssd

    generator = torch.Generator().manual_seed(4)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    lengths = [5, 40, 1, 27]  # boundaries inside chunks of 16 and on one
    T, H, P, G, N = sum(lengths), 2, 8, 1, 16
    cu_seqlens = cu_seqlens_from_lengths(lengths, device="cpu")
    # mamba-ssm marks each token with its sequence's index instead.
    seq_idx = torch.arange(len(lengths), dtype=torch.int32).repeat_interleave(torch.tensor(lengths))
    seq_idx = seq_idx[None]
    x, dt, B, C = randn(1, T, H, P), randn(1, T, H), randn(1, T, G, N), randn(1, T, G, N)
    A = -torch.rand(H, generator=generator, dtype=torch.float64) - 0.5
    inputs, grad_y = [x, dt, A, B, C], randn(1, T, H, P)

    f32 = [t.float() for t in inputs]
    _, ref_states = mamba_chunk_scan_combined(
        *f32, 16, seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=True,
        return_varlen_states=True,
    )  # fmt: skip
    ref = _values_and_grads(
        lambda *t: [mamba_chunk_scan_combined(*t, 16, seq_idx=seq_idx, dt_softplus=True)],
        inputs, [grad_y], torch.float32,
    )  # fmt: skip
    names = "y, dx, ddt, dA, dB, dC".split(", ")
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        values = _values_and_grads(
            lambda *t, backend=backend: [ssd(*t, cu_seqlens=cu_seqlens, backend=backend)[0]],
            inputs, [grad_y], dtype,
        )  # fmt: skip
        with torch.no_grad():
            _, states = ssd(
                *(t.to(dtype) for t in inputs), cu_seqlens=cu_seqlens, output_final_state=True,
                backend=backend,
            )  # fmt: skip
        title = (
            f"ssd ({backend}, {str(dtype)[6:]}, cu_seqlens {lengths}) vs "
            "mamba_chunk_scan_combined (fp32, seq_idx)"
        )
        _report(title, [*names, "final states"], [*values, states], [*ref, ref_states])


def main() -> None:
    selective_scan_ref, selective_state_update_ref, ssd_minimal_discrete = _import_references()
    check_selective_scan(selective_scan_ref)
    check_ssd(ssd_minimal_discrete)
    if interpreter_enabled():
        _run_mamba_triton_on_cpu()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    check_state_update(selective_state_update_ref, selective_state_update)
    check_chunk_scan(mamba_chunk_scan_combined)
    check_chunk_scan_varlen(mamba_chunk_scan_combined)


if __name__ == "__main__":
    main()
