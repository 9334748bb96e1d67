"""Triton decode step of the Mamba-1 selective scan: one token, one kernel.

Per channel d and state n (delta after its bias and softplus, when asked):
    h[d, n] <- exp(delta[d] A[d, n]) h[d, n] + delta[d] u[d] B[g, n]
    y[d] = (sum_n C[g, n] h[d, n] + D[d] u[d]) silu(z[d])
Everything a token needs, bias and softplus, D skip and z gate included, happens in one
launch: the torch step takes about a dozen small ones, and a decode step is launch-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memzoo.kernels._core import AotSpec, aot_signature, register_aot
from memzoo.kernels.selective_scan.triton import _block

STEP_WARPS = 4


@triton.jit
def _softplus(x):
    """log(1 + e^x) as torch computes it: x itself above 20, and log1p's leading terms where
    e^x is too small for 1 + e^x to hold it."""
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e)))


def _step_launch(N: int, channels_per_group: int) -> dict:
    """BD channels x BN states a program: tiles of 512, so that one sequence of Mamba's width
    (1536 channels, N=16) is spread over 48 programs."""
    BN = max(2, triton.next_power_of_2(N))
    BD = max(2, min(triton.next_power_of_2(channels_per_group), 512 // BN))
    return {"BD": BD, "BN": BN}


# One program: BD channels of one group and one sequence.
@triton.jit
def _state_update_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, state_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    new_state_ptr,
    Dm, G, NS,
    BD: tl.constexpr, BN: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A = _block(A_ptr, Dm, G, NS, BD, BN)
    i_n = tl.cast(tl.program_id(1), tl.int64)

    u = tl.load(u_ptr + i_n * Dm + o_d, mask=m_d, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + i_n * Dm + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        delta = _softplus(delta)
    group = (i_n * G + i_g) * NS + o_s
    Bn = tl.load(B_ptr + group, mask=m_s, other=0.0).to(tl.float32)
    Cn = tl.load(C_ptr + group, mask=m_s, other=0.0).to(tl.float32)
    h = tl.load(state_ptr + i_n * Dm * NS + block, mask=m_ds, other=0.0).to(tl.float32)

    h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bn[None, :]
    y = tl.sum(h * Cn[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + i_n * Dm + o_d, mask=m_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(new_state_ptr + i_n * Dm * NS + block, h, mask=m_ds)
    tl.store(y_ptr + i_n * Dm + o_d, y.to(y_ptr.dtype.element_ty), mask=m_d)


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def selective_state_update_triton(u, delta, A, B, C, state, *, D, z, delta_bias, delta_softplus):
    """Triton decode step; contract of `memzoo.kernels.selective_scan.selective_state_update`
    (inputs checked). Returns y `[b, Dm]` in u's dtype and a new fp32 state `[b, Dm, N]`."""
    batch, Dm = u.shape
    G, N = B.shape[1], B.shape[2]
    launch = _step_launch(N, Dm // G)
    u, delta, B, C, state = (t.contiguous() for t in (u, delta, B, C, state))
    A = A.contiguous()
    y = torch.empty_like(u)
    new_state = torch.empty(batch, Dm, N, dtype=torch.float32, device=u.device)
    if batch:
        grid = (G * triton.cdiv(Dm // G, launch["BD"]), batch)
        _state_update_kernel[grid](
            u, delta, A, B, C, state,
            u if D is None else D.contiguous(), u if z is None else z.contiguous(),
            u if delta_bias is None else delta_bias.contiguous(), y, new_state,
            Dm, G, N, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **launch,
            num_warps=STEP_WARPS,
        )  # fmt: skip
    return y, new_state


# --------------------------------------------------------------------------------------
# AOT: Mamba's decode step (bf16 activations, fp32 parameters and states)
# --------------------------------------------------------------------------------------


def _register_aot_specs() -> None:
    types = {f"{n}_ptr": "*bf16" for n in ("u", "delta", "B", "C", "z", "y")}
    for N in (4, 16):
        constexprs = {
            **_step_launch(N, 1536),
            **{"HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True},
        }
        register_aot(
            AotSpec(
                name=f"selective_state_update-N{N}-BD{constexprs['BD']}",
                kernel=_state_update_kernel,
                signature=aot_signature(_state_update_kernel, constexprs, types),
                constexprs=constexprs,
                num_warps=STEP_WARPS,
                multiple_of_16=("Dm",),
            )
        )


_register_aot_specs()
