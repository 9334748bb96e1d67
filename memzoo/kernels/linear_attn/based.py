"""BASED linear attention (Taylor feature map, d = 16), fused on GPU.

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]               F = 273 features
    phi(q)·phi(k) = 1 + s + s^2 / 2,  s = q·k / sqrt(d)
    o_t = phi(q_t) S_t / (phi(q_t) z_t + eps),  S_t = sum_{r<=t} phi(k_r)^T v_r,  z_t = sum phi(k_r)

The Triton backend (based_triton.py) reads only the raw 16-dim q, k and builds the features in
registers; the torch backend materialises phi and runs the chunked `linear_attn` reference.
States are `linear_attn`'s normalised (S, z) on the "taylor" map in both cases.
"""

from __future__ import annotations

import torch

from memzoo.kernels._core import InputCheck, eager_under_compile, register_op, resolve_backend
from memzoo.kernels.linear_attn.feature_maps import get_feature_map
from memzoo.kernels.linear_attn.reference import linear_attn_chunk_ref, linear_attn_step_ref

__all__ = ["FEATURE_DIM", "NUM_FEATURES", "based_attn", "based_attn_step"]

FEATURE_DIM = 16  # d: q and k come in with 16 features (BASED's d')
NUM_FEATURES = 1 + FEATURE_DIM + FEATURE_DIM**2  # 273: the full Taylor map's output size

State = tuple[torch.Tensor, torch.Tensor]


def _check_feature_dim(check: InputCheck, q: torch.Tensor) -> None:
    if check.sizes["D"] != FEATURE_DIM:
        raise check.error(
            f"q and k must have feature dim D={FEATURE_DIM} (the raw features the Taylor map "
            f"expands to {NUM_FEATURES}), got q of shape {tuple(q.shape)}"
        )


def _check_state(check: InputCheck, name: str, state) -> State | None:
    """The pair (S `[N, H, 273, V]`, z `[N, H, 273]`), or None."""
    if state is None:
        return None
    if not (isinstance(state, tuple | list) and len(state) == 2):
        raise TypeError(
            f"{check.op}: {name} must be the pair (S [N, H, {NUM_FEATURES}, V], "
            f"z [N, H, {NUM_FEATURES}]), got {type(state).__name__}"
        )
    check.sizes["F"] = NUM_FEATURES
    check.origin["F"] = f"= 1 + {FEATURE_DIM} + {FEATURE_DIM}^2 Taylor features"
    return (
        check.tensor(f"{name}[0]", state[0], "N H F V"),
        check.tensor(f"{name}[1]", state[1], "N H F"),
    )


@register_op("torch", "triton")
def based_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """BASED causal linear attention with the full Taylor feature map, fused.

    Equals `linear_attn(taylor(q), taylor(k), v, normalize=True, eps=eps, ...)` with
    `taylor = get_feature_map("taylor")`, i.e. per (sequence, head)
        o_t = sum_{s<=t} A_ts v_s / (sum_{s<=t} A_ts + eps),  A_ts = 1 + q_t·k_s/4 + (q_t·k_s)^2/32
    plus the initial state's terms. The Triton backend builds the 273 features in registers
    and never stores them (nor their gradients); the torch backend runs the unfused map.

    Args:
        q, k: `[B, T, H, 16]`, raw (before the feature map); fp16, bf16 or fp32 for Triton.
        v: `[B, T, H, V]`, any V.
        eps: added to the normaliser.
        initial_state: (S `[N, H, 273, V]`, z `[N, H, 273]`), `linear_attn`'s normalised state
            in the "taylor" map's feature order [1, x / 2, vec(x x^T) / sqrt(32)] (so S[:, :, 0]
            sums v, z[:, :, 0] counts tokens); any float dtype.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (B must be 1); each
            sequence starts from its own initial state and never sees the others.
        backend: "auto", "torch" or "triton".

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state (S, z) in fp32 in the layout of
        `initial_state` (None unless asked). N is B, or the number of packed sequences.
        The state continues with `based_attn_step` or with `linear_attn_step` on taylor features.

    Raises:
        ValueError: q/k feature dim is not 16, shapes disagree, bad cu_seqlens or backend.
        TypeError: non-tensor inputs, a state that is not an (S, z) pair, integer tensors.
        BackendUnavailableError: backend="triton" without CUDA tensors or the interpreter.

    Example (prefill, then decode)::

        o, state = based_attn(q, k, v, output_final_state=True)
        o_next, state = based_attn_step(q_next, k_next, v_next, state)
    """
    check = InputCheck("based_attn")
    q = check.tensor("q", q, "B T H D")
    _check_feature_dim(check, q)
    k = check.tensor("k", k, "B T H D")
    v = check.tensor("v", v, "B T H V")
    B, T = check.sizes["B"], check.sizes["T"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    check.sizes["N"] = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N"] = "the number of sequences"
    initial_state = _check_state(check, "initial_state", initial_state)

    backend = resolve_backend("based_attn", backend, q.device, v.dtype)
    if backend == "triton":
        from memzoo.kernels.linear_attn.based_triton import based_attn_triton

        return based_attn_triton(
            q, k, v, eps=eps, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    taylor = get_feature_map("taylor")
    return eager_under_compile(linear_attn_chunk_ref)(
        taylor(q), taylor(k), v, scale=1.0, normalize=True, eps=eps,
        initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip


@register_op("torch", "triton")
def based_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """One decode step of `based_attn`: the Taylor map of one token, then `linear_attn_step`.

    Args:
        q, k: `[B, H, 16]` raw; v: `[B, H, V]`.
        state: (S `[B, H, 273, V]`, z `[B, H, 273]`), e.g. a prefill's final state.
        eps, backend: as in `based_attn`.

    Returns:
        o `[B, H, V]` in v's dtype and the new state (S, z) in fp32 (new tensors; `state` is
        not modified).

    Raises:
        ValueError / TypeError as `based_attn`.
    """
    check = InputCheck("based_attn_step")
    q = check.tensor("q", q, "B H D")
    _check_feature_dim(check, q)
    k = check.tensor("k", k, "B H D")
    v = check.tensor("v", v, "B H V")
    check.sizes["N"], check.origin["N"] = check.sizes["B"], "= B from q"
    state = _check_state(check, "state", state)

    backend = resolve_backend("based_attn_step", backend, q.device, v.dtype)
    run = linear_attn_step_ref
    if backend == "triton":
        from memzoo.kernels.linear_attn.triton import linear_attn_step_triton

        run = linear_attn_step_triton
    taylor = get_feature_map("taylor")
    return run(taylor(q), taylor(k), v, state, g=None, scale=1.0, normalize=True, eps=eps)
