"""The quadratic ("segment-sum") form of SSD from the Mamba-2 paper: the oracle for `ssd`.

Per head, with a_t = dt_t A and L[t, s] = exp(a_{s+1} + ... + a_t) for s <= t (else 0):
    y = (C B^T ∘ L) (x dt) + exp(a_1 + ... + a_t) C_t h_0^T + D x,   then y *= silu(z)
Computed without `linear_attn`, so the two are independent. `[T, T]` per head: tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """`[..., T]` -> `[..., T, T]`: sum of a[s+1..t] at [t, s] for s <= t, -inf above.

    Summing the masked increments directly (not differencing one cumulative sum) is the
    paper's stable form: no cancellation between two long sums.
    """
    T = a.shape[-1]
    increments = a[..., None, :].expand(*a.shape, T).transpose(-1, -2)  # [..., t, s] = a_t
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = increments.masked_fill(~strictly_lower, 0.0).cumsum(-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def ssd_quadratic_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SSD through `[T, T]` matrices: x `[B, T, H, P]`, dt `[B, T, H]`, A `[H]`,
    B, C `[B, T, G, N]`, D `[H]` or `[H, P]`, z `[B, T, H, P]`, dt_bias `[H]`,
    initial_state `[B, H, P, N]`.

    Computes in fp64 for fp64 x, else fp32. Returns y `[B, T, H, P]` in x's dtype and the
    final state `[B, H, P, N]` in the compute dtype (None unless asked).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    H = x.shape[2]
    xs = x.to(dtype)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = B.to(dtype).repeat_interleave(H // B.shape[2], dim=2)  # [B, T, H, N]
    Ch = C.to(dtype).repeat_interleave(H // C.shape[2], dim=2)
    a = (dt * A.to(dtype)).transpose(1, 2)  # [B, H, T]
    L = segsum(a).exp()  # [B, H, T, S]
    xdt = xs * dt[..., None]

    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh) * L
    y = torch.einsum("bhts,bshp->bthp", scores, xdt)
    decay_from_start = a.cumsum(-1).exp()  # [B, H, T]
    if initial_state is not None:
        h0 = initial_state.to(dtype)
        y = (
            y
            + torch.einsum("bthn,bhpn->bthp", Ch, h0) * decay_from_start.transpose(1, 2)[..., None]
        )
    if D is not None:
        D = D.to(dtype)
        y = y + xs * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(x.dtype)
    if not output_final_state:
        return y, None
    # The last row of L decays every token to the end of the sequence.
    final = torch.einsum("bhs,bshn,bshp->bhpn", L[..., -1, :], Bh, xdt)
    if initial_state is not None:
        final = final + decay_from_start[..., -1, None, None] * initial_state.to(dtype)
    return y, final
