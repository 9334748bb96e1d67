"""SSD (Mamba-2's state-space duality layer) as gated linear attention.

Per sequence and head h, with A_h < 0 one scalar per head and dt_t > 0:
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t^T B_t        h: [P, N]
    y_t = h_t C_t + D_h x_t,   then y_t *= silu(z_t) with a gate
This is `linear_attn` with q = C, k = B, v = x * dt, g = dt * A, scale 1: the linear-attention
state `[K=N, V=P]` is h transposed. B and C are shared by the H / G heads of a group.
The recurrence runs in the `linear_attn` kernels (torch chunked path or Triton); the dt
preprocessing is elementwise torch before them, the D skip and the z gate torch after them,
or on the Triton backend one kernel each way (`selective_scan/gate_triton.py`). The decode step
`ssd_step` has a Triton kernel of its own that does all of it in one launch (`step_triton.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memzoo.kernels._core import InputCheck, register_op, resolve_backend
from memzoo.kernels.linear_attn import linear_attn, linear_attn_step

__all__ = ["ssd", "ssd_step"]


def _check_params(check: InputCheck, A, D, dt_bias):
    """A `[H]` (< 0), D `[H]` or `[H, P]`, dt_bias `[H]`; after x fixed H and P."""
    A = check.tensor("A", A, "H")
    if check.on_host(A):
        if bool((A >= 0).any()):
            raise check.error(
                f"A must be negative (one decay rate per head, e.g. -exp(A_log)), "
                f"got max {A.max().item():.4g}"
            )
    else:
        torch._assert_async((A < 0).all(), f"{check.op}: A must be negative")
    if D is not None:
        if isinstance(D, torch.Tensor) and D.dim() == 2:
            D = check.tensor("D", D, "H P")
        else:
            D = check.tensor("D", D, "H")
    dt_bias = check.optional("dt_bias", dt_bias, "H")
    return A, D, dt_bias


def _check_groups(check: InputCheck) -> None:
    H, G = check.sizes["H"], check.sizes["G"]
    if H % G != 0:
        raise check.error(
            f"the number of heads H={H} (from x) must be a multiple of the number of groups "
            f"G={G} (from B and C): head h reads group h // (H // G)"
        )


def _check_state(check: InputCheck, name: str, state, dims: str) -> torch.Tensor:
    """Check a state `[.., H, P, N]` and return it transposed to the kernels' `[.., H, N, P]`.

    A state returned by `ssd` / `ssd_step` is a transposed view of a contiguous kernel state,
    so it goes back in without a copy (`InputCheck.tensor` would make the `[P, N]` view
    contiguous first).
    """
    names = dims.split()
    if isinstance(state, torch.Tensor) and state.dim() == len(names):
        expected = [check.sizes[n] for n in names]
        if list(state.shape) != expected:
            shape = ", ".join(f"{n}={s}" for n, s in zip(names, expected, strict=True))
            raise check.error(
                f"{name} must have shape [{shape}] (mamba-ssm's layout: head dim P before "
                f"d_state N), got {tuple(state.shape)}"
            )
        kernel_dims = " ".join([*names[:-2], names[-1], names[-2]])
        return check.tensor(name, state.transpose(-1, -2), kernel_dims)
    return check.tensor(name, state, dims)  # raises the type / number-of-dims error


def _time_steps(check: InputCheck, dt, dt_bias, dt_softplus: bool, dtype: torch.dtype):
    """dt (+ dt_bias), through softplus if asked, in `dtype`; checked >= 0 otherwise."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        return F.softplus(dt)
    if check.on_host(dt):
        if bool((dt < 0).any()):
            raise check.error(
                "with dt_softplus=False, dt (+ dt_bias) must be >= 0 (a time step), "
                f"got min {dt.min().item():.4g}"
            )
    else:
        torch._assert_async((dt >= 0).all(), f"{check.op}: dt (+ dt_bias) must be >= 0")
    return dt


def _per_head(t: torch.Tensor, H: int) -> torch.Tensor:
    """`[..., G, N]` -> `[..., H, N]`, head h reading group h // (H // G)."""
    G, N = t.shape[-2:]
    if G == H:
        return t
    return t.unsqueeze(-2).expand(*t.shape[:-1], H // G, N).reshape(*t.shape[:-2], H, N)


def _skip_and_gate(o, x, D, z, dtype):
    """y = (o + D x) * silu(z), computed in `dtype`, returned in x's dtype."""
    if D is None and z is None:
        return o.to(x.dtype)
    y = o.to(dtype)
    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)


def _skip_and_gate_triton(o, x, D, z):
    """`_skip_and_gate` in the fused Triton kernels, over the H P channels of a token."""
    from memzoo.kernels.selective_scan.gate_triton import skip_and_gate_triton

    if D is not None:
        H, P = x.shape[-2:]
        D = (D[:, None].expand(H, P) if D.dim() == 1 else D).reshape(H * P)
    flat = [None if t is None else t.flatten(-2) for t in (o, x, z)]
    return skip_and_gate_triton(flat[0], flat[1], D, flat[2]).view(x.shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@register_op("torch", "triton")
def ssd(
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
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2 SSD scan (scalar decay per head), chunked through `linear_attn`.

        dt = softplus(dt + dt_bias)                          (dt_bias optional; softplus if asked)
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t^T B_t            h: [P, N] per head, fp32
        y_t = (h_t C_t + D x_t) * silu(z_t)                  (D, z optional)

    As gated linear attention: q = C, k = B (group broadcast to heads), v = x * dt,
    g = dt * A (<= 0), scale 1, and the state `[N, P]` of `linear_attn` is h transposed.

    Args:
        x: `[B, T, H, P]` inputs (P = head dim).
        dt: `[B, T, H]` time steps, before softplus when `dt_softplus`.
        A: `[H]` one negative decay rate per head (Mamba-2's `-exp(A_log)`).
        B, C: `[B, T, G, N]` input and output projections (N = d_state); H must be a
            multiple of G, head h using group h // (H // G).
        D: `[H]` or `[H, P]` skip connection, or None.
        z: `[B, T, H, P]` gate (y *= silu(z)), or None.
        dt_bias: `[H]` added to dt (with or without softplus), or None.
        dt_softplus: apply softplus to dt + dt_bias; without it dt + dt_bias must be >= 0.
        initial_state: `[N_seq, H, P, N]` (mamba-ssm's layout), any float dtype, or None.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int32 `[N_seq + 1]` offsets of sequences packed along T (B must be 1);
            each sequence starts from its own initial state and never sees the others.
        backend: "auto", "torch" or "triton", passed to `linear_attn`.

    Returns:
        y `[B, T, H, P]` in x's dtype, and the final state `[N_seq, H, P, N]` in fp32 (fp64
        for fp64 inputs on the torch path; None unless asked). The state is a transposed
        view of `linear_attn`'s `[N_seq, H, N, P]` state, so feeding it back (to `ssd_step`
        or as `initial_state`) copies nothing; call `.contiguous()` if you need that layout.
        N_seq is B, or the number of packed sequences.

    dt, D, z and the gate are computed in fp32 (fp64 for fp64 x); v = x * dt is rounded to
    x's dtype for the kernel.

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes or devices, A not
        negative, H not a multiple of G, or negative dt without softplus (checked eagerly on
        CPU, with `torch._assert_async` on CUDA).

    Example (Mamba-2 layer, prefill then decode)::

        y, state = ssd(x, dt, -torch.exp(A_log), B, C, D=D, z=z, dt_bias=dt_bias,
                       output_final_state=True)
        y_t, state = ssd_step(x_t, dt_t, -torch.exp(A_log), B_t, C_t, state, D=D, z=z_t,
                              dt_bias=dt_bias)
    """
    check = InputCheck("ssd")
    x = check.tensor("x", x, "B T H P")
    dt = check.tensor("dt", dt, "B T H")
    B = check.tensor("B", B, "B T G N")
    C = check.tensor("C", C, "B T G N")
    _check_groups(check)
    A, D, dt_bias = _check_params(check, A, D, dt_bias)
    z = check.optional("z", z, "B T H P")
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=check.sizes["T"], batch=check.sizes["B"])
    check.sizes["N_seq"] = check.sizes["B"] if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N_seq"] = "the number of sequences"
    if initial_state is not None:
        initial_state = _check_state(check, "initial_state", initial_state, "N_seq H P N")

    H, dtype = check.sizes["H"], _compute_dtype(x)
    dt = _time_steps(check, dt, dt_bias, dt_softplus, dtype)
    o, state = linear_attn(
        _per_head(C, H).to(x.dtype),
        _per_head(B, H).to(x.dtype),
        (x.to(dtype) * dt[..., None]).to(x.dtype),
        g=dt * A.to(dtype),
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    if resolve_backend("ssd", backend, x.device, x.dtype) == "triton":
        y = _skip_and_gate_triton(o, x, D, z)
    else:
        y = _skip_and_gate(o, x, D, z, dtype)
    return y, None if state is None else state.transpose(-1, -2)


@register_op("torch", "triton")
def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `ssd`: one Triton kernel, or `linear_attn_step` and elementwise torch.

    Args:
        x: `[B, H, P]`; dt: `[B, H]`; A: `[H]` (< 0); B, C: `[B, G, N]`;
        state: `[B, H, P, N]` (e.g. a prefill's final state).
        D, z (`[B, H, P]`), dt_bias, dt_softplus, backend: as in `ssd`.

    Returns:
        y `[B, H, P]` in x's dtype and the new state `[B, H, P, N]` in fp32 (fp64 for fp64
        inputs on the torch path), a new tensor (a transposed view, as in `ssd`): `state`
        is not modified.
    """
    check = InputCheck("ssd_step")
    x = check.tensor("x", x, "B H P")
    dt = check.tensor("dt", dt, "B H")
    B = check.tensor("B", B, "B G N")
    C = check.tensor("C", C, "B G N")
    _check_groups(check)
    A, D, dt_bias = _check_params(check, A, D, dt_bias)
    z = check.optional("z", z, "B H P")
    state = _check_state(check, "state", state, "B H P N")

    H, dtype = check.sizes["H"], _compute_dtype(x)
    if resolve_backend("ssd_step", backend, x.device, x.dtype) == "triton":
        from memzoo.kernels.ssd.step_triton import ssd_step_triton

        if not dt_softplus:
            _time_steps(check, dt, dt_bias, dt_softplus, dtype)  # dt + dt_bias >= 0
        y, new_state = ssd_step_triton(
            x, dt, A, B, C, state, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
        return y, new_state.transpose(-1, -2)
    dt = _time_steps(check, dt, dt_bias, dt_softplus, dtype)
    o, new_state = linear_attn_step(
        _per_head(C, H).to(x.dtype),
        _per_head(B, H).to(x.dtype),
        (x.to(dtype) * dt[..., None]).to(x.dtype),
        state,
        g=dt * A.to(dtype),
        scale=1.0,
        backend=backend,
    )
    return _skip_and_gate(o, x, D, z, dtype), new_state.transpose(-1, -2)
