"""Mixture-of-Memories (Du et al. 2025, arXiv 2502.13685): routing tokens to memories, and the
memories' gated linear attention, without host syncs.

A router sends every token to k of M memories; each memory is a gated linear attention over
only the tokens routed to it, and a token's output is the routing-weighted sum of what its k
memories return:
    w_t, m_t = top-k(softmax(logits_t)), renormalised            w_t, m_t: [k]
    S^m_t = exp(g^m_t) S^m_{t-1} + k^m_t^T v^m_t    if m in m_t, else S^m_{t-1}
    o_t = s * sum_j w_tj q_t S^{m_tj}_t
The ops:
- `route`: weights and memory indices from router logits.
- `group_by_memory`: a stable grouping of the B*T*k token copies by (sequence, memory, time):
  permutation, inverse, and per-(sequence, memory) offsets to pass as `cu_seqlens`.
- `gather` / `scatter_weighted`: token rows into the grouped order, and the weighted sum back.
- `memory_attn` / `memory_attn_step`: the memories' attention for a sequence / one token.
Every grid and buffer is sized from shapes (B*T*k copies, B*M or N*M groups), never from the
routing, and nothing reads routing results back to the host (no `.item()`, `.tolist()`,
`nonzero()`): on CUDA the work queues without a sync, and on CPU the torch paths compile with
`torch.compile(fullgraph=True)`. The one host read left is linear_attn's torch varlen form,
which reads cu_seqlens: `memory_attn` on torch with packed sequences (`cu_seqlens`), or with
method="grouped". Input values (index ranges, g <= 0) are checked eagerly on CPU, and with
`torch._assert_async` on CUDA or while torch.compile traces.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from memzoo.kernels._core import InputCheck, check_choice, register_op, resolve_backend
from memzoo.kernels.linear_attn import linear_attn, linear_attn_step
from memzoo.kernels.linear_attn.reference import linear_attn_chunk_ref, linear_attn_step_ref
from memzoo.kernels.mom.reference import (
    gather_ref,
    group_by_memory_ref,
    memory_attn_masked_ref,
    memory_attn_step_ref,
    route_ref,
    scatter_weighted_ref,
)

__all__ = [
    "METHODS",
    "MemoryGrouping",
    "gather",
    "group_by_memory",
    "memory_attn",
    "memory_attn_step",
    "route",
    "scatter_weighted",
]

METHODS = ("auto", "grouped", "masked")


class MemoryGrouping(NamedTuple):
    """Token copies grouped by (sequence, memory, time); copy c is token row c // k, pick c % k.

    perm: `[P]` int64, the copy at each grouped position (P = B * T * k).
    inverse: `[P]` int64, the grouped position of each copy.
    cu_seqlens: int32 `[N * M + 1]`, offsets of the groups, sequence-major: group n * M + m
        holds sequence n's copies routed to memory m, in time order (empty groups allowed).
    indices: `[B, T, k]` int64, the routing this grouping was built from.
    num_memories: M.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    indices: torch.Tensor
    num_memories: int


def _check_values(check: InputCheck, ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the bool tensor `ok` is all true, without a host sync
    where one would cost (CUDA) or break the graph (torch.compile): an async assert there."""
    if check.on_host(ok):
        if not bool(ok.all()):
            raise check.error(message)
    else:
        torch._assert_async(ok.all(), f"{check.op}: {message}")


def _check_int(check: InputCheck, name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise check.error(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise check.error(f"{name} must be at most {high}, got {value}")


def _check_indices(check: InputCheck, indices, num_memories: int, dims: str) -> torch.Tensor:
    """indices int64 in [0, M), the k picks of a token distinct."""
    indices = check.tensor("indices", indices, dims, floating=False, dtypes=(torch.int64,))
    k = indices.shape[-1]
    _check_int(check, "topk (indices.shape[-1])", k, 1, num_memories)
    _check_values(
        check,
        (indices >= 0) & (indices < num_memories),
        f"indices must lie in [0, num_memories={num_memories})",
    )
    if k > 1:
        same = indices[..., :, None] == indices[..., None, :]
        off_diagonal = ~torch.eye(k, dtype=torch.bool, device=indices.device)
        _check_values(check, ~(same & off_diagonal).any(-1), "a token's k indices must differ")
    return indices


def _check_triton_memories(check: InputCheck, num_memories: int) -> None:
    from memzoo.kernels.mom.triton import MAX_MEMORIES

    if num_memories > MAX_MEMORIES:
        raise check.error(
            f"the Triton kernels take at most {MAX_MEMORIES} memories, got {num_memories}; "
            "use backend='torch'"
        )


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


@register_op("torch", "triton")
def route(
    logits: torch.Tensor, topk: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: softmax in fp32, the k most probable memories, weights renormalised.

    Args:
        logits: `[B, T, M]` router logits, any float dtype.
        topk: k, 1 <= k <= M.
        backend: "auto", "torch" or "triton".

    Returns:
        weights `[B, T, k]` fp32 (fp64 for fp64 logits on the torch path), summing to 1 over k
        and differentiable with respect to the logits; indices `[B, T, k]` int64, most
        probable first.
    """
    check = InputCheck("route")
    logits = check.tensor("logits", logits, "B T M")
    M = check.sizes["M"]
    _check_int(check, "topk", topk, 1, M)
    backend = resolve_backend("route", backend, logits.device, logits.dtype)
    if backend == "triton":
        _check_triton_memories(check, M)
        from memzoo.kernels.mom.triton import route_triton

        return route_triton(logits, topk)
    return route_ref(logits, topk)


@register_op("torch", "triton")
def group_by_memory(
    indices: torch.Tensor,
    num_memories: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> MemoryGrouping:
    """Group the B*T*k token copies by (sequence, memory), in time order inside each group.

    Args:
        indices: `[B, T, k]` int64 memory indices in [0, M), distinct per token (as `route`
            returns them).
        num_memories: M.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (B must be 1); groups
            are then per (packed sequence, memory), so no memory mixes two sequences.
        backend: "auto", "torch" (a stable sort) or "triton" (histogram + prefix sums).

    Returns:
        a `MemoryGrouping`; its `cu_seqlens` `[N * M + 1]` (N = B, or the number of packed
        sequences) goes straight to a varlen `linear_attn` over the grouped rows.

    Example (the grouped rows of q, one varlen attention, and back)::

        groups = group_by_memory(indices, M)
        q_grouped = gather(q.flatten(2), groups)                  # [B*T*k, H*K]
        ...
        o, _ = linear_attn(q_g, k_g, v_g, g=g_g, cu_seqlens=groups.cu_seqlens)
        out = scatter_weighted(o.flatten(2)[0], groups, weights)  # [B, T, H*V]
    """
    check = InputCheck("group_by_memory")
    _check_int(check, "num_memories", num_memories, 1)
    indices = _check_indices(check, indices, num_memories, "B T k")
    B, T = check.sizes["B"], check.sizes["T"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    backend = resolve_backend("group_by_memory", backend, indices.device)
    if backend == "triton":
        _check_triton_memories(check, num_memories)
        from memzoo.kernels.mom.triton import group_by_memory_triton

        perm, inverse, offsets = group_by_memory_triton(indices, num_memories, cu_seqlens)
    else:
        perm, inverse, offsets = group_by_memory_ref(indices, num_memories, cu_seqlens)
    return MemoryGrouping(perm, inverse, offsets, indices, num_memories)


def _check_grouping(check: InputCheck, grouping) -> MemoryGrouping:
    if not isinstance(grouping, MemoryGrouping):
        raise TypeError(
            f"{check.op}: grouping must be the MemoryGrouping of group_by_memory, "
            f"got {type(grouping).__name__}"
        )
    check.tensor("grouping.indices", grouping.indices, "B T k", floating=False)
    check.sizes["P"] = grouping.perm.numel()
    check.origin["P"] = "= B * T * k from grouping"
    return grouping


@register_op("torch", "triton")
def gather(x: torch.Tensor, grouping: MemoryGrouping, *, backend: str = "auto") -> torch.Tensor:
    """Token rows into the grouped order: row p of the result is copy perm[p]'s row.

    Args:
        x: `[B, T, F]`, one row per token, given to each of its k copies; or `[B, T, M, F]`,
            one row per token and memory, where copy (t, j) takes memory indices[t, j]'s row.
        grouping: from `group_by_memory`.
        backend: "auto", "torch" or "triton".

    Returns:
        `[P, F]` in x's dtype, P = B * T * k. Differentiable with respect to x (rows of
        memories a token did not pick get zero gradient).
    """
    check = InputCheck("gather")
    grouping = _check_grouping(check, grouping)
    check.sizes["M"], check.origin["M"] = grouping.num_memories, "from grouping"
    dims = "B T M F" if isinstance(x, torch.Tensor) and x.dim() == 4 else "B T F"
    x = check.tensor("x", x, dims)
    backend = resolve_backend("gather", backend, x.device, x.dtype)
    perm, inverse, _, indices, M = grouping
    if backend == "triton":
        from memzoo.kernels.mom.triton import gather_triton

        return gather_triton(x, perm, inverse, indices, M)
    return gather_ref(x, perm, indices, M)


@register_op("torch", "triton")
def scatter_weighted(
    y: torch.Tensor, grouping: MemoryGrouping, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Grouped rows back to tokens: out[b, t] = sum_j weights[b, t, j] * y[inverse[(b, t, j)]].

    Args:
        y: `[P, F]` rows in the grouped order (P = B * T * k).
        grouping: from `group_by_memory`.
        weights: `[B, T, k]` routing weights (as `route` returns them).
        backend: "auto", "torch" or "triton".

    Returns:
        `[B, T, F]` in y's dtype, summed in fp32 (fp64 for fp64 inputs on the torch path);
        differentiable with respect to y and weights.
    """
    check = InputCheck("scatter_weighted")
    grouping = _check_grouping(check, grouping)
    y = check.tensor("y", y, "P F")
    weights = check.tensor("weights", weights, "B T k")
    backend = resolve_backend("scatter_weighted", backend, y.device, y.dtype)
    if backend == "triton":
        from memzoo.kernels.mom.triton import scatter_weighted_triton

        return scatter_weighted_triton(y, grouping.perm, grouping.inverse, weights.float())
    return scatter_weighted_ref(y, grouping.inverse, weights)


# --------------------------------------------------------------------------------------
# Memory attention
# --------------------------------------------------------------------------------------


def _gated_linear_attn(backend: str):
    """(sequence form, one-token form) of gated linear attention on `backend`. On torch the
    reference forms are called directly: linear_attn's own check reads g on the host (a graph
    break under torch.compile), and the callers here checked g already without one."""
    if backend == "torch":
        return linear_attn_chunk_ref, linear_attn_step_ref
    return (
        functools.partial(linear_attn, backend=backend),
        functools.partial(linear_attn_step, backend=backend),
    )


def _check_memory_inputs(check: InputCheck, q, k, v, g, weights, indices, time: str):
    """Shapes of q, k, v, g, weights, indices with or without a time dim; g <= 0."""
    q = check.tensor("q", q, f"B {time} H K")
    k = check.tensor("k", k, f"B {time} M H K")
    v = check.tensor("v", v, f"B {time} M H V")
    if g is not None:
        g = check.tensor("g", g, f"B {time} M H")
        _check_values(check, g <= 0, "g is a log-decay and must be <= 0")
    weights = check.tensor("weights", weights, f"B {time} k")
    indices = _check_indices(check, indices, check.sizes["M"], f"B {time} k")
    return q, k, v, g, weights, indices


@register_op("torch", "triton")
def memory_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    method: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The memories' gated linear attention, each over only the tokens routed to it.

    o_t = s * sum_j weights[t, j] * q_t S^{indices[t, j]}_t, where memory m's state
    S^m_t = exp(g^m_t) S^m_{t-1} + k^m_t^T v^m_t advances only at tokens routed to m.

    Args:
        q: `[B, T, H, K]`, shared by the memories.
        k: `[B, T, M, H, K]`, v: `[B, T, M, H, V]`, g: `[B, T, M, H]` log-decay (<= 0) or
            None: every memory's projections of every token (only the routed ones are read).
        weights: `[B, T, k]` routing weights; indices: `[B, T, k]` int64, distinct per token.
        scale: s, default K^-1/2.
        initial_state: `[N, M, H, K, V]`, each memory's state before the first token.
        output_final_state: also return the states after the last token.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (B must be 1).
        method: "grouped" runs one varlen `linear_attn` over the B*T*k token copies grouped
            by (sequence, memory) (`group_by_memory`, `gather`, `scatter_weighted`);
            "masked" runs every memory over every token, where a token not routed to it
            writes nothing and does not decay it (M / k times the attention work, static
            shapes, no grouping). "auto": grouped on the Triton/CUDA backends, masked on torch,
            where it runs under torch.compile (the torch varlen path reads cu_seqlens on the
            host).
        backend: "auto", "torch" or "triton" (for every op this calls).

    Returns:
        o `[B, T, H, V]` in v's dtype, and the final states `[N, M, H, K, V]` in fp32 (fp64
        for fp64 inputs on the torch path; None unless asked). N is B, or the number of
        packed sequences.
    """
    check = InputCheck("memory_attn")
    q, k, v, g, weights, indices = _check_memory_inputs(check, q, k, v, g, weights, indices, "T")
    check_choice("memory_attn", "method", method, METHODS)
    B, T, M, H, K = k.shape
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    check.sizes["N"] = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N"] = "the number of sequences"
    initial_state = check.optional("initial_state", initial_state, "N M H K V")
    scale = K**-0.5 if scale is None else float(scale)
    backend = resolve_backend("memory_attn", backend, q.device, v.dtype)
    if method == "auto":
        method = "masked" if backend == "torch" else "grouped"
    attend, _ = _gated_linear_attn(backend)
    if method == "masked":
        return memory_attn_masked_ref(
            q, k, v, g, weights, indices, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, attend=attend,
        )  # fmt: skip

    V, P = v.shape[-1], B * T * indices.shape[-1]
    groups = group_by_memory(indices, M, cu_seqlens=cu_seqlens, backend=backend)
    q_g = gather(q.reshape(B, T, H * K), groups, backend=backend).view(1, P, H, K)
    k_g = gather(k.reshape(B, T, M, H * K), groups, backend=backend).view(1, P, H, K)
    v_g = gather(v.reshape(B, T, M, H * V), groups, backend=backend).view(1, P, H, V)
    g_g = None if g is None else gather(g, groups, backend=backend).view(1, P, H)
    state = None if initial_state is None else initial_state.reshape(-1, H, K, V)
    o, final = attend(
        q_g, k_g, v_g, g=g_g, scale=scale, initial_state=state,
        output_final_state=output_final_state, cu_seqlens=groups.cu_seqlens,
    )  # fmt: skip
    o = scatter_weighted(o.view(P, H * V), groups, weights, backend=backend)
    return o.view(B, T, H, V), None if final is None else final.view(-1, M, H, K, V)


@register_op("torch", "triton")
def memory_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    weights: torch.Tensor,
    indices: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `memory_attn`: the token reads, decays and writes only its k memories.

    Args:
        q: `[B, H, K]`; k: `[B, M, H, K]`; v: `[B, M, H, V]`; g: `[B, M, H]` or None.
        weights, indices: `[B, k]`.
        state: `[B, M, H, K, V]` (e.g. `memory_attn`'s final state).
        scale, backend: as in `memory_attn`.

    Returns:
        o `[B, H, V]` in v's dtype and the new state `[B, M, H, K, V]` (a new tensor, equal to
        `state` for the memories the token was not routed to).
    """
    check = InputCheck("memory_attn_step")
    q, k, v, g, weights, indices = _check_memory_inputs(check, q, k, v, g, weights, indices, "")
    state = check.tensor("state", state, "B M H K V")
    scale = check.sizes["K"] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend("memory_attn_step", backend, q.device, v.dtype)
    _, step = _gated_linear_attn(backend)
    return memory_attn_step_ref(q, k, v, g, weights, indices, state, scale=scale, step=step)
