"""Mamba-1 selective scan (S6), with a one-token decode step.

Per channel d and state n, with delta = softplus(delta + delta_bias) (each part optional):
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[g, n] u_t[d]
    y_t[d] = sum_n C_t[g, n] h_t[d, n] + D[d] u_t[d],      then y_t *= silu(z_t[d])
where channel d reads the B/C group g = d // (Dm / G). The decay depends on (d, n) jointly, so
unlike SSD (Mamba-2) it is not a gated linear attention; see ALGORITHMS.md.
"""

from __future__ import annotations

import torch

from memzoo.kernels._core import (
    InputCheck,
    eager_under_compile,
    register_op,
    resolve_backend,
)
from memzoo.kernels.selective_scan.reference import (
    selective_scan_chunk_ref,
    selective_state_update_ref,
)

__all__ = ["selective_scan", "selective_state_update"]


def _check_A(check: InputCheck, A) -> torch.Tensor:
    A = check.tensor("A", A, "D N")
    if check.on_host(A):
        if bool((A >= 0).any()):
            raise check.error(
                "A must be negative everywhere (Mamba stores A = -exp(A_log)), "
                f"got max {A.max().item():.4g}"
            )
    else:
        torch._assert_async((A < 0).all(), f"{check.op}: A must be negative everywhere")
    return A


def _check_groups(check: InputCheck, B) -> None:
    """Channel d reads group d // (D / G): D must be a multiple of G."""
    D, G = check.sizes["D"], check.sizes["G"]
    if G == 0 or D % G:
        raise check.error(
            f"B and C have G={G} groups, which must divide the {D} channels of u "
            f"(B has shape {tuple(B.shape)})"
        )


@register_op("torch", "triton")
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1 selective scan over time, linear in T; accumulates in fp32.

    Args:
        u: `[B, T, Dm]` the input (time-major like the rest of memzoo; mamba-ssm's
            selective_scan_fn takes `[B, Dm, L]`).
        delta: `[B, T, Dm]` the step size, before `delta_bias` and softplus. The scan is stable
            for any delta >= 0 (after softplus it always is).
        A: `[Dm, N]` real, every entry < 0 (checked: eagerly on CPU, without a host sync on CUDA).
        B, C: `[B, T, G, N]` input-dependent projections; channel d reads group d // (Dm / G),
            so G must divide Dm (G = 1: mamba-ssm's shared B/C).
        D: `[Dm]` skip connection (y += D u), or None.
        z: `[B, T, Dm]` gate (y *= silu(z)), or None.
        delta_bias: `[Dm]` added to delta (before softplus, if any), or None.
        delta_softplus: apply softplus to delta (+ bias); Mamba does.
        initial_state: `[N_seq, Dm, N]` the state before each sequence; any float dtype.
        output_final_state: also return the state after each sequence's last token.
        cu_seqlens: int32 `[N_seq + 1]` offsets of sequences packed along T (then B must be 1);
            each sequence starts from its own initial state, and an empty one hands its
            initial state through.
        backend: "auto", "torch" or "triton" (see memzoo.kernels._core.resolve_backend).

    Returns:
        y `[B, T, Dm]` in u's dtype, and the final state `[N_seq, Dm, N]` (None unless asked) in
        fp32, fp64 for fp64 inputs on the torch path. N_seq is B, or the number of packed
        sequences.

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes, devices, A >= 0,
        groups that do not divide Dm or bad cu_seqlens; BackendUnavailableError when `backend`
        cannot run here.

    Example (a Mamba block's scan; two sequences of lengths 3 and 5 packed together)::

        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        y, state = selective_scan(
            x, dt, -torch.exp(A_log), B, C, D=D, z=z, delta_bias=dt_bias,
            delta_softplus=True, cu_seqlens=cu, output_final_state=True,
        )
        # x, dt, z: [1, 8, Dm]; B, C: [1, 8, 1, N]; state: [2, Dm, N]
    """
    check = InputCheck("selective_scan")
    u = check.tensor("u", u, "B T D")
    delta = check.tensor("delta", delta, "B T D")
    B = check.tensor("B", B, "B T G N")
    _check_groups(check, B)
    C = check.tensor("C", C, "B T G N")
    A = _check_A(check, A)
    D = check.optional("D", D, "D")
    z = check.optional("z", z, "B T D")
    delta_bias = check.optional("delta_bias", delta_bias, "D")
    Bsz, T = check.sizes["B"], check.sizes["T"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=Bsz)
    check.sizes["N_seq"] = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N_seq"] = "the number of sequences"
    initial_state = check.optional("initial_state", initial_state, "N_seq D N")

    backend = resolve_backend("selective_scan", backend, u.device, u.dtype)
    if backend == "triton":
        from memzoo.kernels.selective_scan.triton import selective_scan_triton

        run = selective_scan_triton
    else:
        run = eager_under_compile(selective_scan_chunk_ref)
    return run(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@register_op("torch", "triton")
def selective_state_update(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `selective_scan`.

    Args:
        u, delta: `[B, Dm]` the new token.
        A: `[Dm, N]`, every entry < 0.
        B, C: `[B, G, N]` with G dividing Dm.
        state: `[B, Dm, N]` the state so far (e.g. a prefill's final state).
        D, delta_bias: `[Dm]` or None; z: `[B, Dm]` or None; delta_softplus: as in
            `selective_scan`.
        backend: "auto", "torch" or "triton" (one kernel for the whole step, bias and
            softplus, D skip and z gate included; "auto" takes it for CUDA tensors).

    Returns:
        y `[B, Dm]` in u's dtype and the new state `[B, Dm, N]` in fp32 (fp64 for fp64
        inputs on the torch path; a new tensor: `state` is not modified).
    """
    check = InputCheck("selective_state_update")
    u = check.tensor("u", u, "B D")
    delta = check.tensor("delta", delta, "B D")
    B = check.tensor("B", B, "B G N")
    _check_groups(check, B)
    C = check.tensor("C", C, "B G N")
    A = _check_A(check, A)
    state = check.tensor("state", state, "B D N")
    D = check.optional("D", D, "D")
    z = check.optional("z", z, "B D")
    delta_bias = check.optional("delta_bias", delta_bias, "D")

    backend = resolve_backend("selective_state_update", backend, u.device, u.dtype)
    if backend == "triton":
        from memzoo.kernels.selective_scan.state_update_triton import (
            selective_state_update_triton,
        )

        run = selective_state_update_triton
    else:
        run = selective_state_update_ref
    return run(
        u,
        delta,
        A,
        B,
        C,
        state,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
    )
