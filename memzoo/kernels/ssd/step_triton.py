"""Triton decode step of SSD (Mamba-2): one token, one kernel.

Per head h (dt after its bias and softplus, when asked), on the state `[N, P]` (the kernels'
layout, the transpose of mamba-ssm's):
    S <- exp(dt_h A_h) S + B_g (dt_h x_h)^T,    y_h = C_g^T S + D_h x_h,   y_h *= silu(z_h)
with g = h // (H / G). The torch step runs the recurrence in `linear_attn_step` and the time
step, D skip and z gate around it, about ten launches; a decode step is launch-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memzoo.kernels._core import AotSpec, aot_signature, register_aot
from memzoo.kernels.selective_scan.state_update_triton import _softplus

STEP_WARPS = 4


def _step_launch(N: int, P: int) -> dict:
    """BN states x BP head channels a program: tiles of up to 2048 (Mamba-2's N=128, P=64:
    4 programs a head)."""
    BN = max(2, triton.next_power_of_2(N))
    BP = max(2, min(triton.next_power_of_2(P), 2048 // BN))
    return {"BN": BN, "BP": BP}


# One program: BP channels of one head of one sequence, all N states.
@triton.jit
def _ssd_step_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, state_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, new_state_ptr,
    H, G, NS, P,
    BN: tl.constexpr, BP: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    i_p = tl.program_id(0)
    i_h = tl.cast(tl.program_id(1), tl.int64)
    i_b = tl.cast(tl.program_id(2), tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    o_n = tl.arange(0, BN)
    m_n = o_n < NS
    m_np = m_n[:, None] & m_p[None, :]
    head = i_b * H + i_h

    dt = tl.load(dt_ptr + head).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + i_h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    decay = tl.exp(dt * tl.load(A_ptr + i_h).to(tl.float32))
    x = tl.load(x_ptr + head * P + o_p, mask=m_p, other=0.0).to(tl.float32)
    group = (i_b * G + i_h // (H // G)) * NS + o_n
    Bn = tl.load(B_ptr + group, mask=m_n, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + group, mask=m_n, other=0.0).to(tl.float32)
    tile = (head * NS + o_n[:, None]) * P + o_p[None, :]
    S = tl.load(state_ptr + tile, mask=m_np, other=0.0).to(tl.float32)

    S = decay * S + Bn[:, None] * (dt * x)[None, :]
    y = tl.sum(Cn[:, None] * S, axis=0)
    if HAS_D:
        if D_PER_CHANNEL:
            y += tl.load(D_ptr + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + i_h).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + head * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(new_state_ptr + tile, S, mask=m_np)
    tl.store(y_ptr + head * P + o_p, y.to(y_ptr.dtype.element_ty), mask=m_p)


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def ssd_step_triton(x, dt, A, B, C, state, *, D, z, dt_bias, dt_softplus):
    """Triton decode step; contract of `memzoo.kernels.ssd.ssd_step` with the state already in
    the kernels' layout `[b, H, N, P]` (inputs checked). Returns y `[b, H, P]` in x's dtype and
    the new fp32 state `[b, H, N, P]`."""
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    launch = _step_launch(N, P)
    x, dt, B, C, state = (t.contiguous() for t in (x, dt, B, C, state))
    y = torch.empty_like(x)
    new_state = torch.empty(batch, H, N, P, dtype=torch.float32, device=x.device)
    if batch:
        _ssd_step_kernel[(triton.cdiv(P, launch["BP"]), H, batch)](
            x, dt, A.contiguous(), B, C, state,
            x if D is None else D.contiguous(), x if z is None else z.contiguous(),
            x if dt_bias is None else dt_bias.contiguous(), y, new_state,
            H, G, N, P, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
            HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, **launch,
            num_warps=STEP_WARPS,
        )  # fmt: skip
    return y, new_state


# --------------------------------------------------------------------------------------
# AOT: Mamba-2's decode step (bf16 activations, fp32 parameters and states)
# --------------------------------------------------------------------------------------


def _register_aot_specs() -> None:
    types = {f"{n}_ptr": "*bf16" for n in ("x", "B", "C", "z", "y")}
    for N, P in ((64, 64), (128, 64)):
        constexprs = {
            **_step_launch(N, P),
            **{"HAS_D": True, "D_PER_CHANNEL": False, "HAS_Z": True, "HAS_BIAS": True},
            "SOFTPLUS": True,
        }
        register_aot(
            AotSpec(
                name=f"ssd_step-N{N}-P{P}",
                kernel=_ssd_step_kernel,
                signature=aot_signature(_ssd_step_kernel, constexprs, types),
                constexprs=constexprs,
                num_warps=STEP_WARPS,
                multiple_of_16=("P",),
            )
        )


_register_aot_specs()
