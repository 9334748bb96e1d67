"""Plain-torch Mixture-of-Memories routing and memory attention: the oracle and the CPU path.

Routing (the grouped layout the Triton kernels build too):
- `route_ref`: softmax in fp32, top-k, weights renormalised over the k picks.
- `group_by_memory_ref`: token copy c = (row, j) of a `[R = B*T, k]` index tensor has the key
  `sequence(row) * M + indices[row, j]`; a stable sort of the keys is the permutation, and a
  histogram of the keys with a prefix sum gives the per-(sequence, memory) offsets. Nothing is
  read back to the host (`scatter_add_`, not `bincount`).
- `gather_ref` / `scatter_weighted_ref`: token rows into the grouped order and back.

Memory attention, o_t = sum_j w_tj GLA_{m_tj}(t), each memory a gated linear attention over
only the tokens routed to it:
- `memory_attn_recurrent_ref`: token by token, memory by memory (the oracle).
- `memory_attn_masked_ref`: the CPU path. Every memory runs over every token, but a token not
  routed to it writes nothing (k = 0) and does not decay its state (g = 0), so at each routed
  token the state equals that of the memory's own subsequence; outputs are weighted by the
  dense routing weights, 0 where a memory was not picked. Shapes are static and nothing reads
  the data on the host (without cu_seqlens), so it runs under `torch.compile(fullgraph=True)`.
- `memory_attn_step_ref`: one decode token; only its k memories' states are read and written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memzoo.kernels.linear_attn.reference import linear_attn_chunk_ref, linear_attn_step_ref


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------


def route_ref(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[B, T, M]` -> weights `[B, T, k]` (fp32, fp64 for fp64 logits) summing to 1
    over k, and memory indices `[B, T, k]` int64, most probable first."""
    probs = logits.to(_compute_dtype(logits)).softmax(-1)
    weights, indices = probs.topk(topk, dim=-1)
    return weights / weights.sum(-1, keepdim=True), indices


def _sequence_ids(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """The sequence of every row of a `[B * T]` flattening (int64): row // T, or the packed
    sequence it falls in."""
    rows = torch.arange(B * T, device=device)
    if cu_seqlens is None:
        return rows // T
    return torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)


def group_by_memory_ref(
    indices: torch.Tensor, num_memories: int, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of the B*T*k token copies by (sequence, memory, time).

    indices: `[B, T, k]` int64 in [0, M), distinct per token; cu_seqlens: int32 `[N + 1]`
    (B == 1) or None (N = B). Copy c is row c // k, pick c % k.
    Returns perm `[P]` (the copy at each grouped position), inverse `[P]` (the grouped position
    of each copy), both int64, and int32 offsets `[N * M + 1]` of each (sequence, memory) group.
    """
    B, T, k = indices.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    seq = _sequence_ids(B, T, cu_seqlens, indices.device)
    keys = (seq[:, None] * num_memories + indices.reshape(B * T, k)).flatten()
    counts = torch.zeros(N * num_memories, dtype=torch.int64, device=indices.device)
    counts.scatter_add_(0, keys, torch.ones_like(keys))
    offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    perm = torch.sort(keys, stable=True).indices
    positions = torch.arange(perm.numel(), device=perm.device)
    inverse = torch.empty_like(perm).scatter_(0, perm, positions)
    return perm, inverse, offsets


def gather_ref(
    x: torch.Tensor, perm: torch.Tensor, indices: torch.Tensor, num_memories: int
) -> torch.Tensor:
    """Rows of x in the grouped order `[P, F]`.

    x: `[B, T, F]` (the token's row goes to each of its k copies) or `[B, T, M, F]` (copy (row,
    j) takes the row of its memory, indices[row, j]).
    """
    B, T, k = indices.shape
    token = perm // k
    if x.dim() == 3:
        return x.reshape(B * T, -1).index_select(0, token)
    source = token * num_memories + indices.flatten().index_select(0, perm)
    return x.reshape(B * T * num_memories, -1).index_select(0, source)


def scatter_weighted_ref(
    y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """out[b, t] = sum_j weights[b, t, j] * y[inverse[(b, t, j)]]: y `[P, F]` grouped,
    weights `[B, T, k]`; returns `[B, T, F]` in y's dtype, summed in fp32 (fp64)."""
    B, T, k = weights.shape
    dtype = _compute_dtype(y, weights)
    copies = y.index_select(0, inverse).view(B, T, k, -1).to(dtype)
    return (copies * weights.to(dtype)[..., None]).sum(2).to(y.dtype)


# --------------------------------------------------------------------------------------
# Memory attention
# --------------------------------------------------------------------------------------


def _routing_mask(indices: torch.Tensor, weights: torch.Tensor, num_memories: int):
    """(picked `[B, T, M]` bool, dense weights `[B, T, M]`, 0 where a memory was not picked)."""
    B, T, _ = indices.shape
    dense = weights.new_zeros(B, T, num_memories).scatter(-1, indices, weights)
    picked = torch.zeros(B, T, num_memories, dtype=torch.bool, device=indices.device)
    return picked.scatter(-1, indices, True), dense


def memory_attn_masked_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    attend=linear_attn_chunk_ref,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every memory over every token, masked (see the module docstring).

    q `[B, T, H, K]`; k `[B, T, M, H, K]`; v `[B, T, M, H, V]`; g `[B, T, M, H]` or None;
    weights, indices `[B, T, k]`; initial_state `[N, M, H, K, V]`. `attend` is the gated linear
    attention to run (the torch chunked form by default; any function with its signature).
    Returns o `[B, T, H, V]` in v's dtype and the final state `[N, M, H, K, V]` (or None).
    """
    B, T, M, H, K = k.shape
    V = v.shape[-1]
    picked, dense = _routing_mask(indices, weights, M)
    keep = picked[..., None].to(k.dtype)
    k = k * keep[..., None]
    g = None if g is None else g * keep

    def streams(x: torch.Tensor) -> torch.Tensor:
        # [B, T, M, ...] -> [B * M, T, ...], one sequence per (batch, memory); with cu_seqlens
        # (B == 1) the M streams go back to back along time: [1, M * T, ...].
        rest = x.shape[3:]
        x = x.transpose(1, 2).reshape(B * M, T, *rest)
        return x if cu_seqlens is None else x.reshape(1, M * T, *rest)

    q_all = q[:, :, None].expand(B, T, M, H, K)
    cu, state = None, initial_state
    if cu_seqlens is not None:
        # Stream m holds sequence n at cu[n] + m * T; states go (memory, sequence) in that order.
        starts = cu_seqlens[:-1].long()[None, :] + T * torch.arange(M, device=q.device)[:, None]
        cu = F.pad(starts.flatten(), (0, 1), value=M * T).to(torch.int32)
        if initial_state is not None:
            state = initial_state.transpose(0, 1).reshape(-1, H, K, V)
    elif initial_state is not None:
        state = initial_state.reshape(B * M, H, K, V)
    o, final = attend(
        streams(q_all), streams(k), streams(v), g=None if g is None else streams(g),
        scale=scale, initial_state=state, output_final_state=output_final_state, cu_seqlens=cu,
    )  # fmt: skip
    o = o.view(B, M, T, H, V)
    dtype = _compute_dtype(o, dense)
    out = torch.einsum("btm,bmthv->bthv", dense.to(dtype), o.to(dtype)).to(v.dtype)
    if final is None:
        return out, None
    if cu_seqlens is not None:
        return out, final.view(M, -1, H, K, V).transpose(0, 1).contiguous()
    return out, final.view(B, M, H, K, V)


def memory_attn_step_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    weights: torch.Tensor,
    indices: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float,
    step=linear_attn_step_ref,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: only its k memories read, decay and write.

    q `[B, H, K]`; k `[B, M, H, K]`; v `[B, M, H, V]`; g `[B, M, H]` or None; weights, indices
    `[B, k]`; state `[B, M, H, K, V]`. `step` is the one-token gated linear attention (the torch
    form by default). Returns o `[B, H, V]` and the new state (a new tensor).
    """
    B, M, H, K = k.shape
    V = v.shape[-1]
    topk = indices.shape[1]

    def pick(x: torch.Tensor) -> torch.Tensor:
        """[B, M, ...] -> the routed memories' rows, [B * k, ...]."""
        index = indices.view(B, topk, *([1] * (x.dim() - 2))).expand(B, topk, *x.shape[2:])
        return x.gather(1, index).flatten(0, 1)

    q_copies = q[:, None].expand(B, topk, H, K).flatten(0, 1)
    o, new = step(
        q_copies, pick(k), pick(v), pick(state), g=None if g is None else pick(g), scale=scale
    )
    index = indices.view(B, topk, 1, 1, 1).expand(B, topk, H, K, V)
    state = state.scatter(1, index, new.view(B, topk, H, K, V).to(state.dtype))
    dtype = _compute_dtype(o, weights)
    o = (o.view(B, topk, H, V).to(dtype) * weights.to(dtype)[..., None, None]).sum(1)
    return o.to(v.dtype), state


def memory_attn_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, memory by memory: shapes as `memory_attn_masked_ref`.

    Returns o `[B, T, H, V]` and the final state `[N, M, H, K, V]`, in fp32 (fp64).
    """
    B, T, M, H, K = k.shape
    V = v.shape[-1]
    dtype = _compute_dtype(q, k, v)
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    N = B if cu_seqlens is None else len(offsets) - 1
    state = q.new_zeros(N, M, H, K, V, dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype).clone()
    o = q.new_zeros(B, T, H, V, dtype=dtype)
    # (state row, batch row, times) of every sequence.
    if cu_seqlens is None:
        sequences = [(b, b, range(T)) for b in range(B)]
    else:
        sequences = [(n, 0, range(offsets[n], offsets[n + 1])) for n in range(N)]
    for s, b, times in sequences:
        for t in times:
            for j, m in enumerate(indices[b, t].tolist()):
                if g is not None:
                    state[s, m] = state[s, m] * g[b, t, m].to(dtype).exp()[:, None, None]
                k_t, v_t = k[b, t, m].to(dtype), v[b, t, m].to(dtype)
                state[s, m] = state[s, m] + k_t[:, :, None] * v_t[:, None, :]
                read = (q[b, t].to(dtype)[:, :, None] * state[s, m]).sum(1) * scale
                o[b, t] += weights[b, t, j].to(dtype) * read
    return o, state
