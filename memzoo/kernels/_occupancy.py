"""How many programs of a compiled Triton kernel one GPU multiprocessor holds at once.

A launch whose programs each walk a long chain of dependent steps (a scan over time) is only
as wide as the GPU holds at once; splitting the work to fill it needs that number, and it
depends on the registers the compiled kernel uses, which change with Triton's version: the
selective scan's forward tile takes 64 registers a thread from Triton 3.7 and 91 from 3.6,
8 programs of 4 warps per multiprocessor against 5. So it is read from the compiled binary,
not written down.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

# Registers are handed to warps in blocks of this many (sm_50 through sm_90).
_REGISTER_BLOCK = 256
# Shared memory the driver keeps back per resident block (sm_80, sm_90).
_RESERVED_SHARED = 1024


@functools.cache
def _limits(device_index: int) -> tuple[int, int, int, int]:
    """(registers, threads, shared bytes, multiprocessors) of CUDA device `device_index`,
    per multiprocessor but the last."""
    props = torch.cuda.get_device_properties(device_index)
    return (
        getattr(props, "regs_per_multiprocessor", 65536),
        getattr(props, "max_threads_per_multi_processor", 2048),
        getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
        props.multi_processor_count,
    )


def sm_count(device: torch.device) -> int:
    """Multiprocessors of CUDA device `device`."""
    return _limits(device.index if device.index is not None else torch.cuda.current_device())[3]


def programs_per_sm(registers: int, num_warps: int, shared: int, limits: tuple) -> int:
    """Programs of `num_warps` warps, each thread using `registers` registers and each program
    `shared` bytes of shared memory, that one multiprocessor with `limits` (`_limits`) holds at
    once; at least 1."""
    regs_per_sm, threads_per_sm, shared_per_sm, _ = limits
    per_warp = -(-max(registers, 1) * 32 // _REGISTER_BLOCK) * _REGISTER_BLOCK
    by_registers = regs_per_sm // per_warp // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_shared = shared_per_sm // (shared + _RESERVED_SHARED) if shared else by_threads
    return max(1, min(by_registers, by_threads, by_shared))


_RESIDENT: dict[tuple, int] = {}


@functools.cache
def _binary_options(kernel: Any) -> frozenset[str]:
    """Launch keywords that pick `kernel`'s binary: its constexprs, warps and stages (worked
    out once: `resident_programs` runs on every long scan call)."""
    names = {p.name for p in kernel.params if p.is_constexpr}
    return frozenset(names | {"num_warps", "num_stages"})


def resident_programs(kernel: Any, args: tuple, kwargs: dict, device: torch.device) -> int:
    """Programs of `kernel`, compiled for the launch `kernel[grid](*args, **kwargs)` on CUDA
    device `device`, that one multiprocessor holds at once.

    Compiles the kernel if it is not yet (a launch with the same constexprs and dtypes then
    finds it compiled). Cached per kernel, device, constexprs, warps and tensor dtypes: integer
    arguments only specialise the binary on divisibility, which moves its registers little.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    constexprs = _binary_options(kernel)
    key = (
        kernel,
        index,
        tuple(sorted((k, v) for k, v in kwargs.items() if k in constexprs)),
        tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args),
    )
    if key not in _RESIDENT:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        try:
            compiled._init_handles()  # loads the binary: its register count comes with it
            registers = compiled.n_regs
        except AttributeError as error:  # a Triton whose compiled kernels keep them elsewhere
            warnings.warn(
                f"cannot read the registers of {getattr(kernel, '__name__', kernel)} "
                f"({error}); sizing its launch as for one program a multiprocessor",
                stacklevel=2,
            )
            _RESIDENT[key] = 1
        else:
            shared = getattr(compiled.metadata, "shared", 0) or 0
            num_warps = kwargs.get("num_warps", 4)
            _RESIDENT[key] = programs_per_sm(registers, num_warps, shared, _limits(index))
    return _RESIDENT[key]
