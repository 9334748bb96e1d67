"""Chunked gated linear attention: linear attention, BASED, RetNet-style decay, SSD, MoM memories.

Recurrence per (sequence, head), with scale s and log-decay g_t <= 0:
    S_t = exp(g_t) S_{t-1} + k_t^T v_t                  S: [K, V]
    o_t = s q_t S_t
and with `normalize=True` also
    z_t = exp(g_t) z_{t-1} + k_t                        z: [K]
    o_t = s q_t S_t / (s q_t z_t + eps)
"""

from __future__ import annotations

import torch

from memzoo.kernels._core import InputCheck, eager_under_compile, register_op, resolve_backend
from memzoo.kernels.linear_attn.based import based_attn, based_attn_step
from memzoo.kernels.linear_attn.feature_maps import FEATURE_MAPS, get_feature_map
from memzoo.kernels.linear_attn.prefix import prefix_state
from memzoo.kernels.linear_attn.reference import linear_attn_chunk_ref, linear_attn_step_ref

__all__ = [
    "FEATURE_MAPS",
    "based_attn",
    "based_attn_step",
    "get_feature_map",
    "linear_attn",
    "linear_attn_step",
    "prefix_state",
]

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def default_scale(K: int, normalize: bool) -> float:
    """K^-1/2 for plain linear attention; 1 when normalised (the scale then only meets eps)."""
    return 1.0 if normalize else K**-0.5


def _check_state(check: InputCheck, name: str, state, normalize: bool):
    """Validate a state: S `[N, H, K, V]`, or the pair (S, z `[N, H, K]`) when normalised."""
    if state is None:
        return None
    if normalize:
        if not (isinstance(state, tuple | list) and len(state) == 2):
            raise TypeError(
                f"{check.op}: with normalize=True, {name} must be the pair (S [N, H, K, V], "
                f"z [N, H, K]), got {type(state).__name__}"
            )
        return (
            check.tensor(f"{name}[0]", state[0], "N H K V"),
            check.tensor(f"{name}[1]", state[1], "N H K"),
        )
    if isinstance(state, tuple | list):
        raise TypeError(
            f"{check.op}: with normalize=False, {name} must be one tensor S [N, H, K, V], "
            "got a pair"
        )
    return check.tensor(name, state, "N H K V")


def _check_decay(check: InputCheck, g, dims: str):
    if g is None:
        return None
    g = check.tensor("g", g, dims)
    if check.on_host(g):
        if bool((g > 0).any()):
            raise check.error(f"g is a log-decay and must be <= 0, got max {g.max().item():.4g}")
    else:
        torch._assert_async((g <= 0).all(), f"{check.op}: g must be <= 0 (a log-decay)")
    return g


@register_op("torch", "triton")
def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Causal (gated) linear attention, chunked: linear time and memory in T.

    Args:
        q, k: `[B, T, H, K]` (feature-mapped already; see `feature_maps`).
        v: `[B, T, H, V]`.
        g: `[B, T, H]` per-token, per-head log-decay (<= 0), or None for no decay.
        scale: multiplies q; default K^-1/2, or 1 with `normalize`.
        normalize: divide by the running normaliser `s q_t z_t + eps` (BASED, JRT-RNN).
        initial_state: S `[N, H, K, V]`, or (S, z `[N, H, K]`) with `normalize`; any float dtype.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (B must be 1); each
            sequence starts from its own initial state and never sees the others.
        backend: "auto", "torch", "triton" or "cuda".

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state (S, or (S, z) with `normalize`;
        None unless asked) in fp32, fp64 for fp64 inputs on the torch path. N is B, or the
        number of packed sequences.

    Example (a JRT-RNN prefix read non-causally, then causal linear attention)::

        state = prefix_state(k_enc, v_enc, normalize=True)
        o, _ = linear_attn(q, k, v, normalize=True, initial_state=state)
    """
    check = InputCheck("linear_attn")
    q = check.tensor("q", q, "B T H K")
    k = check.tensor("k", k, "B T H K")
    v = check.tensor("v", v, "B T H V")
    g = _check_decay(check, g, "B T H")
    B, T, K = check.sizes["B"], check.sizes["T"], check.sizes["K"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    check.sizes["N"] = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N"] = "the number of sequences"
    initial_state = _check_state(check, "initial_state", initial_state, normalize)
    scale = default_scale(K, normalize) if scale is None else float(scale)

    backend = resolve_backend("linear_attn", backend, q.device, v.dtype)
    if backend == "triton":
        from memzoo.kernels.linear_attn.triton import linear_attn_triton

        run = linear_attn_triton
    else:
        run = eager_under_compile(linear_attn_chunk_ref)
    return run(
        q,
        k,
        v,
        g=g,
        scale=scale,
        normalize=normalize,
        eps=eps,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


@register_op("torch", "triton")
def linear_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, State]:
    """One decode step of `linear_attn`.

    Args:
        q, k: `[B, H, K]`; v: `[B, H, V]`; g: `[B, H]` log-decay or None.
        state: S `[B, H, K, V]`, or (S, z `[B, H, K]`) with `normalize` (e.g. a prefill's
            final state).
        scale, normalize, eps, backend: as in `linear_attn`.

    Returns:
        o `[B, H, V]` in v's dtype and the new state in fp32 (fp64 for fp64 inputs on the
        torch path; new tensors: `state` is not
        modified).
    """
    check = InputCheck("linear_attn_step")
    q = check.tensor("q", q, "B H K")
    k = check.tensor("k", k, "B H K")
    v = check.tensor("v", v, "B H V")
    g = _check_decay(check, g, "B H")
    check.sizes["N"], check.origin["N"] = check.sizes["B"], "= B from q"
    state = _check_state(check, "state", state, normalize)
    scale = default_scale(check.sizes["K"], normalize) if scale is None else float(scale)

    backend = resolve_backend("linear_attn_step", backend, q.device, v.dtype)
    if backend == "triton":
        from memzoo.kernels.linear_attn.triton import linear_attn_step_triton

        run = linear_attn_step_triton
    else:
        run = linear_attn_step_ref
    return run(q, k, v, state, g=g, scale=scale, normalize=normalize, eps=eps)
