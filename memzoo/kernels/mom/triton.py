"""Triton kernels for Mixture-of-Memories routing: top-k, grouping by memory, gather / scatter.

Token rows are the `[R = B * T]` flattening; token copy c = row * k + j is the row's j-th pick.
Every grid is sized from shapes alone (rows, copies, the static chunk bound of
`memzoo.kernels._chunks.ChunkTable`), never from routing results, so nothing waits on the host.

Grouping, stable by (sequence, memory, time), as a histogram and prefix sums:
1. `_histogram_kernel`: per chunk of rows (chunks never cross a sequence), copies per memory.
2. torch on the device: prefix sums over chunks give each sequence's counts per memory, the
   group offsets `cu` `[N * M + 1]`, and where each chunk's copies of memory m start.
3. `_positions_kernel`: a copy's position is its chunk's start for its memory plus the number
   of earlier rows of the chunk that picked the same memory (a cumsum over the chunk);
   it writes the permutation and its inverse.

Weighted scatter back, out_r = sum_j w_rj y[inverse[r k + j]], and its backward:
    dy[p] = w[c] dout[c // k]  with c = perm[p]          (`_gather_kernel`, weighted)
    dw[c] = <y[inverse[c]], dout[c // k]>                (`_weight_grad_kernel`)
Gathering a token's row to its copies has the backward dx_r = sum_j dy[inverse[r k + j]]
(`_combine_kernel`, unweighted); gathering per-memory rows scatters back (`_scatter_rows_kernel`).
Route: the renormalised top-k of softmax(l) is the softmax over the k picked logits, so its
backward is dl_m = w_j (dw_j - sum_i w_i dw_i) where m is pick j, and 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, chunk_rows, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, register_aot

GATHER_ROWS = 32  # rows (copies or tokens) per gather / scatter program
ROUTE_BWD_ROWS = 128  # token rows per route-backward program (it holds no [rows, M] tile)
MAX_MEMORIES = 64
# The route and grouping programs hold [rows, next_pow2(M)] tiles: fewer rows for more
# memories keeps every tile at 2048 elements or less (16 per thread at 4 warps, no spills).
TILE = 2048


def _block(size: int, cap: int) -> int:
    return max(2, min(cap, triton.next_power_of_2(size)))


def _route_rows(M: int) -> int:
    return max(8, min(32, TILE // _block(M, MAX_MEMORIES)))


def _chunk_rows(M: int) -> int:
    """Token rows per grouping program (the chunk size of its ChunkTable)."""
    return max(16, min(64, TILE // _block(M, MAX_MEMORIES)))


def _block_features(D: int) -> int:
    return max(16, min(128, triton.next_power_of_2(D)))


# --------------------------------------------------------------------------------------
# Route
# --------------------------------------------------------------------------------------


# One program: top-k of the logits of BR token rows and the softmax over the k picks.
@triton.jit
def _route_fwd_kernel(
    logits_ptr, weights_ptr, indices_ptr, R, M,
    K: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    o_r = tl.cast(i_r, tl.int64) * BR + tl.arange(0, BR)
    o_m = tl.arange(0, BM)
    o_k = tl.arange(0, BK)
    m_r, m_m = o_r < R, o_m < M
    x = tl.load(
        logits_ptr + o_r[:, None] * M + o_m[None, :], mask=m_r[:, None] & m_m[None, :], other=0.0
    )
    x = tl.where(m_m[None, :], x.to(tl.float32), float("-inf"))

    top = tl.max(x, axis=1)
    weights = tl.zeros([BR, BK], dtype=tl.float32)
    picks = tl.zeros([BR, BK], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(x, axis=1)
        pick = tl.argmax(x, axis=1)
        weights = tl.where(o_k[None, :] == j, tl.exp(best - top)[:, None], weights)
        picks = tl.where(o_k[None, :] == j, pick.to(tl.int64)[:, None], picks)
        x = tl.where(o_m[None, :] == pick[:, None], float("-inf"), x)
    weights = weights / tl.sum(weights, axis=1)[:, None]
    out = o_r[:, None] * K + o_k[None, :]
    m_out = m_r[:, None] & (o_k < K)[None, :]
    tl.store(weights_ptr + out, weights, mask=m_out)
    tl.store(indices_ptr + out, picks, mask=m_out)


# One program: the logit gradients of BR token rows, written at the k picks only (dlogits
# comes zero-filled; a row's picks are distinct, so no two stores meet).
@triton.jit
def _route_bwd_kernel(
    weights_ptr, indices_ptr, dweights_ptr, dlogits_ptr, R, M,
    K: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    o_r = tl.cast(i_r, tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    dot = tl.zeros([BR], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(weights_ptr + o_r * K + j, mask=m_r, other=0.0)
        dot += w * tl.load(dweights_ptr + o_r * K + j, mask=m_r, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        w = tl.load(weights_ptr + o_r * K + j, mask=m_r, other=0.0)
        dw = tl.load(dweights_ptr + o_r * K + j, mask=m_r, other=0.0).to(tl.float32)
        pick = tl.load(indices_ptr + o_r * K + j, mask=m_r, other=0)
        dlogit = w * (dw - dot)
        tl.store(dlogits_ptr + o_r * M + pick, dlogit.to(dlogits_ptr.dtype.element_ty), mask=m_r)


class RouteFunction(torch.autograd.Function):
    """logits `[R, M]` -> weights `[R, k]` fp32 and indices `[R, k]` int64 (not differentiable)."""

    @staticmethod
    def forward(ctx, logits, topk):
        R, M = logits.shape
        weights = torch.empty(R, topk, dtype=torch.float32, device=logits.device)
        indices = torch.empty(R, topk, dtype=torch.int64, device=logits.device)
        BR = _route_rows(M)
        if R:
            _route_fwd_kernel[(triton.cdiv(R, BR),)](
                logits, weights, indices, R, M,
                K=topk, BR=BR, BM=_block(M, MAX_MEMORIES), BK=_block(topk, MAX_MEMORIES),
            )  # fmt: skip
        ctx.save_for_backward(weights, indices)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, dweights, dindices):
        weights, indices = ctx.saved_tensors
        R, M = ctx.logits_shape
        topk = weights.shape[1]
        dlogits = torch.zeros(R, M, dtype=ctx.logits_dtype, device=weights.device)
        if R:
            _route_bwd_kernel[(triton.cdiv(R, ROUTE_BWD_ROWS),)](
                weights, indices, dweights.contiguous(), dlogits, R, M, K=topk, BR=ROUTE_BWD_ROWS
            )
        return dlogits, None


def route_triton(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract of `memzoo.kernels.mom.route` (inputs checked and contiguous)."""
    B, T, M = logits.shape
    weights, indices = RouteFunction.apply(logits.reshape(B * T, M), topk)
    return weights.view(B, T, topk), indices.view(B, T, topk)


# --------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------


@triton.jit
def _picked(indices_ptr, rows, m_t, o_m, K: tl.constexpr):
    """[BT, BM] int32: 1 where a row picked that memory (a row picks a memory at most once)."""
    hits = tl.zeros([rows.shape[0], o_m.shape[0]], dtype=tl.int32)
    for j in tl.static_range(K):
        pick = tl.load(indices_ptr + rows * K + j, mask=m_t, other=-1).to(tl.int32)
        hits += (pick[:, None] == o_m[None, :]).to(tl.int32)
    return hits


# One program: how many copies of each memory one chunk of rows holds (0 for surplus chunks).
@triton.jit
def _histogram_kernel(
    indices_ptr, hist_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr, M,
    K: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    i_c = tl.program_id(0)
    rows, m_t, _, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_m = tl.arange(0, BM)
    counts = tl.sum(_picked(indices_ptr, rows, m_t, o_m, K), axis=0)
    tl.store(hist_ptr + tl.cast(i_c, tl.int64) * M + o_m, counts, mask=o_m < M)


# One program: the grouped positions of one chunk's copies, into perm and its inverse.
@triton.jit
def _positions_kernel(
    indices_ptr, chunk_base_ptr, perm_ptr, inverse_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr, M,
    K: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    i_c = tl.program_id(0)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_m = tl.arange(0, BM)
    hits = _picked(indices_ptr, rows, m_t, o_m, K)
    # Copies of each memory in the chunk's earlier rows: the rank of a copy inside its group.
    # Positions fit int32: they are offsets into cu_seqlens, which is int32.
    earlier = tl.cumsum(hits, axis=0) - hits
    base = tl.load(
        chunk_base_ptr + tl.cast(i_c, tl.int64) * M + o_m, mask=(o_m < M) & valid, other=0
    )
    slots = earlier + base[None, :]
    for j in tl.static_range(K):
        pick = tl.load(indices_ptr + rows * K + j, mask=m_t, other=-1).to(tl.int32)
        position = tl.sum(tl.where(pick[:, None] == o_m[None, :], slots, 0), axis=1)
        position = position.to(tl.int64)
        copy = rows * K + j
        tl.store(inverse_ptr + copy, position, mask=m_t)
        tl.store(perm_ptr + position, copy, mask=m_t)


def group_by_memory_triton(
    indices: torch.Tensor, num_memories: int, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract of `memzoo.kernels.mom.group_by_memory_ref`: (perm, inverse, offsets)."""
    B, T, K = indices.shape
    M, device = num_memories, indices.device
    BT, BM = _chunk_rows(M), _block(M, MAX_MEMORIES)
    cu, fixed_length = packed_offsets(B, T, cu_seqlens, device)
    chunks = ChunkTable(cu, B * T, fixed_length, BT)
    flat = indices.reshape(B * T, K)
    hist = torch.empty(chunks.bound, M, dtype=torch.int32, device=device)
    if chunks.bound:
        _histogram_kernel[(chunks.bound,)](
            flat, hist, cu, chunks.seq, chunks.idx, M, K=K, BT=BT, BM=BM
        )
    # before[c, m]: copies of memory m in chunks before c (all sequences), [bound + 1, M].
    before = F.pad(hist.long().cumsum(0), (0, 0, 1, 0))
    lengths = (cu[1:] - cu[:-1]).long()
    first = chunks.first.long()
    last = first + (lengths + BT - 1) // BT
    counts = before[last] - before[first]  # [N, M]
    offsets = F.pad(counts.flatten().cumsum(0), (1, 0))
    seq = chunks.seq.long().clamp(min=0)
    group_start = offsets[:-1].view(-1, M)[seq]  # surplus chunks get any valid row; unused
    chunk_base = (group_start + before[:-1] - before[first[seq]]).to(torch.int32)

    perm = torch.empty(B * T * K, dtype=torch.int64, device=device)
    inverse = torch.empty_like(perm)
    if chunks.bound:
        _positions_kernel[(chunks.bound,)](
            flat, chunk_base, perm, inverse, cu, chunks.seq, chunks.idx, M,
            K=K, BT=BT, BM=BM,
        )  # fmt: skip
    return perm, inverse, offsets.to(torch.int32)


# --------------------------------------------------------------------------------------
# Gather / scatter
# --------------------------------------------------------------------------------------


# One program: BP grouped rows x BD features; row p copies token row perm[p] // K (or that
# token's row of memory indices[perm[p]]), optionally times the copy's weight.
@triton.jit
def _gather_kernel(
    x_ptr, perm_ptr, indices_ptr, w_ptr, out_ptr, P, D, M,
    K: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
    PER_MEMORY: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    o_p = tl.cast(i_p, tl.int64) * BP + tl.arange(0, BP)
    o_d = i_d * BD + tl.arange(0, BD)
    m_p = o_p < P
    m = m_p[:, None] & (o_d < D)[None, :]
    copy = tl.load(perm_ptr + o_p, mask=m_p, other=0)
    source = copy // K
    if PER_MEMORY:
        source = source * M + tl.load(indices_ptr + copy, mask=m_p, other=0)
    x = tl.load(x_ptr + source[:, None] * D + o_d[None, :], mask=m, other=0.0)
    if HAS_W:
        x = x.to(tl.float32) * tl.load(w_ptr + copy, mask=m_p, other=0.0)[:, None]
    tl.store(out_ptr + o_p[:, None] * D + o_d[None, :], x.to(out_ptr.dtype.element_ty), mask=m)


# One program: BP grouped rows x BD features written back to their token's row of their memory
# (the backward of the per-memory gather; rows of memories a token did not pick stay zero).
@triton.jit
def _scatter_rows_kernel(
    y_ptr, perm_ptr, indices_ptr, out_ptr, P, D, M,
    K: tl.constexpr, BP: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_p, i_d = tl.program_id(0), tl.program_id(1)
    o_p = tl.cast(i_p, tl.int64) * BP + tl.arange(0, BP)
    o_d = i_d * BD + tl.arange(0, BD)
    m_p = o_p < P
    m = m_p[:, None] & (o_d < D)[None, :]
    copy = tl.load(perm_ptr + o_p, mask=m_p, other=0)
    target = (copy // K) * M + tl.load(indices_ptr + copy, mask=m_p, other=0)
    y = tl.load(y_ptr + o_p[:, None] * D + o_d[None, :], mask=m, other=0.0)
    tl.store(out_ptr + target[:, None] * D + o_d[None, :], y, mask=m)


# One program: BR token rows x BD features, each the (weighted) sum of its K grouped copies.
@triton.jit
def _combine_kernel(
    y_ptr, inverse_ptr, w_ptr, out_ptr, R, D,
    K: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = tl.cast(i_r, tl.int64) * BR + tl.arange(0, BR)
    o_d = i_d * BD + tl.arange(0, BD)
    m_r = o_r < R
    m = m_r[:, None] & (o_d < D)[None, :]
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for j in tl.static_range(K):
        position = tl.load(inverse_ptr + o_r * K + j, mask=m_r, other=0)
        y = tl.load(y_ptr + position[:, None] * D + o_d[None, :], mask=m, other=0.0)
        y = y.to(tl.float32)
        if HAS_W:
            y *= tl.load(w_ptr + o_r * K + j, mask=m_r, other=0.0)[:, None]
        acc += y
    tl.store(out_ptr + o_r[:, None] * D + o_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


# One program: the weight gradients of BC copies, <y[inverse[c]], dout[c // K]> over features.
@triton.jit
def _weight_grad_kernel(
    y_ptr, inverse_ptr, dout_ptr, dw_ptr, C, D,
    K: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    i_c = tl.program_id(0)
    o_c = tl.cast(i_c, tl.int64) * BC + tl.arange(0, BC)
    m_c = o_c < C
    position = tl.load(inverse_ptr + o_c, mask=m_c, other=0)
    row = o_c // K
    acc = tl.zeros([BC], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BD)):
        o_d = i_d * BD + tl.arange(0, BD)
        m = m_c[:, None] & (o_d < D)[None, :]
        y = tl.load(y_ptr + position[:, None] * D + o_d[None, :], mask=m, other=0.0)
        dout = tl.load(dout_ptr + row[:, None] * D + o_d[None, :], mask=m, other=0.0)
        acc += tl.sum(y.to(tl.float32) * dout.to(tl.float32), axis=1)
    tl.store(dw_ptr + o_c, acc, mask=m_c)


def _gather(x, perm, K, out_dtype, *, indices=None, M=1, weights=None):
    """Grouped rows `[P, D]` from token rows x `[R, D]`, or with `indices` (flat `[R * K]`)
    from per-memory rows `[R * M, D]`; each row times its copy's weight if `weights` is given."""
    P, D = perm.numel(), x.shape[1]
    out = torch.empty(P, D, dtype=out_dtype, device=x.device)
    BD = _block_features(D)
    if P and D:
        _gather_kernel[(triton.cdiv(P, GATHER_ROWS), triton.cdiv(D, BD))](
            x, perm, perm if indices is None else indices, x if weights is None else weights,
            out, P, D, M,
            K=K, BP=GATHER_ROWS, BD=BD, PER_MEMORY=indices is not None, HAS_W=weights is not None,
        )  # fmt: skip
    return out


def _combine(y, inverse, weights, K, out_dtype):
    """Token rows `[R, D]`: the (weighted) sum of each token's K grouped rows of y `[P, D]`."""
    P, D = y.shape
    R = P // K
    out = torch.empty(R, D, dtype=out_dtype, device=y.device)
    BD = _block_features(D)
    if P and D:
        _combine_kernel[(triton.cdiv(R, GATHER_ROWS), triton.cdiv(D, BD))](
            y, inverse, y if weights is None else weights, out, R, D,
            K=K, BR=GATHER_ROWS, BD=BD, HAS_W=weights is not None,
        )  # fmt: skip
    return out


class GatherFunction(torch.autograd.Function):
    """Token rows x `[R, D]`, or `[R * M, D]` with `per_memory`, -> grouped rows `[P, D]`."""

    @staticmethod
    def forward(ctx, x, perm, inverse, indices, topk, num_memories, per_memory):
        ctx.save_for_backward(perm, inverse, indices)
        ctx.x_shape, ctx.topk, ctx.num_memories = x.shape, topk, num_memories
        ctx.per_memory = per_memory
        if per_memory:
            return _gather(x, perm, topk, x.dtype, indices=indices, M=num_memories)
        return _gather(x, perm, topk, x.dtype)

    @staticmethod
    def backward(ctx, dout):
        perm, inverse, indices = ctx.saved_tensors
        dout = dout.contiguous()
        if not ctx.per_memory:
            dx = _combine(dout, inverse, None, ctx.topk, dout.dtype)
            return dx, None, None, None, None, None, None
        P, D = dout.shape
        dx = torch.zeros(ctx.x_shape, dtype=dout.dtype, device=dout.device)
        BD = _block_features(D)
        if P and D:
            _scatter_rows_kernel[(triton.cdiv(P, GATHER_ROWS), triton.cdiv(D, BD))](
                dout, perm, indices, dx, P, D, ctx.num_memories,
                K=ctx.topk, BP=GATHER_ROWS, BD=BD,
            )  # fmt: skip
        return dx, None, None, None, None, None, None


class ScatterWeightedFunction(torch.autograd.Function):
    """Grouped rows y `[P, D]`, weights `[R * k]` -> token rows `[R, D]` (weighted sums)."""

    @staticmethod
    def forward(ctx, y, weights, perm, inverse, topk):
        ctx.save_for_backward(y, weights, perm, inverse)
        ctx.topk = topk
        return _combine(y, inverse, weights, topk, y.dtype)

    @staticmethod
    def backward(ctx, dout):
        y, weights, perm, inverse = ctx.saved_tensors
        dout = dout.contiguous()
        P, D = y.shape
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = _gather(dout, perm, ctx.topk, y.dtype, weights=weights)
        if ctx.needs_input_grad[1]:
            dw = torch.empty(P, dtype=weights.dtype, device=y.device)
            if P:
                _weight_grad_kernel[(triton.cdiv(P, GATHER_ROWS),)](
                    y, inverse, dout, dw, P, D,
                    K=ctx.topk, BC=GATHER_ROWS, BD=_block_features(D),
                )  # fmt: skip
        return dy, dw, None, None, None


def gather_triton(x, perm, inverse, indices, num_memories):
    """Contract of `memzoo.kernels.mom.gather` (inputs checked and contiguous): x `[B, T, D]`
    or `[B, T, M, D]` -> `[P, D]`."""
    topk = indices.shape[-1]
    per_memory = x.dim() == 4
    rows = x.reshape(-1, x.shape[-1])
    return GatherFunction.apply(
        rows, perm, inverse, indices.reshape(-1), topk, num_memories, per_memory
    )


def scatter_weighted_triton(y, perm, inverse, weights):
    """Contract of `memzoo.kernels.mom.scatter_weighted`: y `[P, D]`, weights `[B, T, k]`
    -> `[B, T, D]` in y's dtype."""
    B, T, topk = weights.shape
    out = ScatterWeightedFunction.apply(y, weights.reshape(-1), perm, inverse, topk)
    return out.view(B, T, y.shape[1])


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16 activations, fp32 weights, int64 indices)
# --------------------------------------------------------------------------------------


AOT_TYPES = {
    **{f"{n}_ptr": "*i64" for n in ("indices", "perm", "inverse")},
    **{f"{n}_ptr": "*i32" for n in ("cu", "chunk_seq", "chunk_idx", "hist", "chunk_base")},
    **{f"{n}_ptr": "*bf16" for n in ("logits", "dlogits", "x", "y", "out", "dout")},
}


def _aot(name, kernel, constexprs, multiple_of_16=()):
    signature = aot_signature(kernel, constexprs, AOT_TYPES)
    register_aot(
        AotSpec(
            name=name, kernel=kernel, signature=signature, constexprs=constexprs,
            multiple_of_16=multiple_of_16,
        )
    )  # fmt: skip


def _register_aot_specs() -> None:
    for M, K in ((4, 2), (16, 4), (MAX_MEMORIES, 8)):
        tag = f"M{M}-K{K}"
        BM, BR = _block(M, MAX_MEMORIES), _route_rows(M)
        _aot(f"mom_route_fwd-{tag}", _route_fwd_kernel,
             {"K": K, "BR": BR, "BM": BM, "BK": _block(K, MAX_MEMORIES)})  # fmt: skip
        _aot(f"mom_route_bwd-K{K}", _route_bwd_kernel, {"K": K, "BR": ROUTE_BWD_ROWS})
        grouping = {"K": K, "BT": _chunk_rows(M), "BM": BM}
        _aot(f"mom_histogram-{tag}", _histogram_kernel, grouping)
        _aot(f"mom_positions-{tag}", _positions_kernel, grouping)
    for K in (3, 9):
        rows = {"K": K, "BD": 128}
        _aot(f"mom_gather-K{K}", _gather_kernel,
             {**rows, "BP": GATHER_ROWS, "PER_MEMORY": True, "HAS_W": True}, ("D",))  # fmt: skip
        _aot(f"mom_scatter_rows-K{K}", _scatter_rows_kernel, {**rows, "BP": GATHER_ROWS}, ("D",))
        _aot(f"mom_combine-K{K}", _combine_kernel,
             {**rows, "BR": GATHER_ROWS, "HAS_W": True}, ("D",))  # fmt: skip
        _aot(f"mom_weight_grad-K{K}", _weight_grad_kernel, {**rows, "BC": GATHER_ROWS}, ("D",))


_register_aot_specs()
