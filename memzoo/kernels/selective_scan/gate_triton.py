"""The D skip and the silu(z) gate after a scan, in one Triton kernel each way.

    out = (y + D u) * silu(z)        y `[R, C]` (the scan's output), u, z `[R, C]`, D `[C]`

Run as torch ops, this is about ten passes over `[B, T, Dm]` tensors, half of them fp32
temporaries (u and z cast up, D u, silu(z), the products, the cast down), and autograd keeps
several of them for a backward of as many more: at Mamba's width that traffic is a large part
of a long sequence's scan. Here the forward reads y, u and z once and writes out; the backward
reads them and the output's gradient once, and writes the gradients of y, u and z and per
row-block partial sums for D's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memzoo.kernels._core import AotSpec, aot_signature, register_aot

# Rows x channels a program: 2048 elements, 16 a thread at 4 warps.
BLOCK_R, BLOCK_C, GATE_WARPS = 16, 128, 4


@triton.jit
def _tile(R, C, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    # int64 offsets: a batch of long sequences at Mamba's width passes 2^31 elements.
    return cols, rows.to(tl.int64)[:, None] * C + cols[None, :], mask


@triton.jit
def _skip_gate_fwd_kernel(
    y_ptr, u_ptr, z_ptr, D_ptr, out_ptr, R, C,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    cols, offs, mask = _tile(R, C, BR, BC)
    out = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        out += D[None, :] * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out *= z * tl.sigmoid(z)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skip_gate_bwd_kernel(
    dout_ptr, y_ptr, u_ptr, z_ptr, D_ptr, dy_ptr, du_ptr, dz_ptr, dD_part_ptr, R, C,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    cols, offs, mask = _tile(R, C, BR, BC)
    grad = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        pre = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_D:
            pre += D[None, :] * u
        # d silu(z) / dz = sig (1 + z (1 - sig))
        dz = grad * pre * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        grad *= z * sig
    tl.store(dy_ptr + offs, grad.to(dy_ptr.dtype.element_ty), mask=mask)
    if HAS_D:
        tl.store(du_ptr + offs, (grad * D[None, :]).to(du_ptr.dtype.element_ty), mask=mask)
        # Masked rows load as zeros: they add nothing to the partial.
        tl.store(dD_part_ptr + tl.program_id(0) * C + cols, tl.sum(grad * u, axis=0),
                 mask=cols < C)  # fmt: skip


def _grid(R: int, C: int) -> tuple[int, int]:
    return triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C)


class SkipGateFunction(torch.autograd.Function):
    """(y + D u) * silu(z) on `[R, C]` rows, with D `[C]` or None and z `[R, C]` or None;
    the output takes u's dtype. Saves only its inputs."""

    @staticmethod
    def forward(ctx, y, u, D, z):
        out = torch.empty_like(u)
        R, C = u.shape
        if R and C:
            _skip_gate_fwd_kernel[_grid(R, C)](
                y, u, u if z is None else z, u if D is None else D, out, R, C,
                HAS_D=D is not None, HAS_Z=z is not None, BR=BLOCK_R, BC=BLOCK_C,
                num_warps=GATE_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(y, u, D, z)
        return out

    @staticmethod
    def backward(ctx, dout):
        y, u, D, z = ctx.saved_tensors
        R, C = u.shape
        dout = dout.contiguous()
        dy = torch.empty_like(y)
        du = None if D is None else torch.empty_like(u)
        dz = None if z is None else torch.empty_like(z)
        parts = None if D is None else u.new_empty(_grid(R, C)[0], C, dtype=torch.float32)
        if R and C:
            _skip_gate_bwd_kernel[_grid(R, C)](
                dout, y, u, u if z is None else z, u if D is None else D, dy,
                dy if du is None else du, dy if dz is None else dz,
                dy if parts is None else parts, R, C,
                HAS_D=D is not None, HAS_Z=z is not None, BR=BLOCK_R, BC=BLOCK_C,
                num_warps=GATE_WARPS,
            )  # fmt: skip
        return dy, du, None if D is None else parts.sum(0).to(D.dtype), dz


def skip_and_gate_triton(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """(y + D u) * silu(z) in fp32, returned in u's dtype: y, u, z `[..., C]` (the same
    shape), D `[C]`; D and z may be None. CUDA tensors, or CPU ones under the interpreter."""
    if D is None and z is None:
        return y.to(u.dtype)
    C = u.shape[-1]
    flat = [None if t is None else t.reshape(-1, C).contiguous() for t in (y, u, z)]
    D = None if D is None else D.contiguous()
    return SkipGateFunction.apply(flat[0], flat[1], D, flat[2]).view(u.shape)


# --------------------------------------------------------------------------------------
# AOT: after Mamba's scan (fp32 scan output, bf16 activations, fp32 D)
# --------------------------------------------------------------------------------------


def _register_aot_specs() -> None:
    constexprs = {"HAS_D": True, "HAS_Z": True, "BR": BLOCK_R, "BC": BLOCK_C}
    bf16 = ("u", "z", "out", "dout", "du", "dz")
    types = {f"{n}_ptr": "*bf16" for n in bf16}
    for name, kernel in (("fwd", _skip_gate_fwd_kernel), ("bwd", _skip_gate_bwd_kernel)):
        register_aot(
            AotSpec(
                name=f"skip_gate_{name}",
                kernel=kernel,
                signature=aot_signature(kernel, constexprs, types),
                constexprs=constexprs,
                num_warps=GATE_WARPS,
                multiple_of_16=("C",),
            )
        )


_register_aot_specs()
