"""Triton kernels for chunked gated linear attention (forward, backward) and its recurrent form.

Sequences are always handled packed: rows of `[R, H, D]` tensors with int32 offsets `cu`,
cut into chunks of BT rows that never cross a sequence boundary (see `memzoo.kernels._chunks`;
`chunk_first[n]` is the global index of sequence n's first chunk).

Per chunk with in-chunk cumulative log-decay b (b_L its last value), state S_c entering it:
    o      = s (Q * exp(b)) S_c + s ((Q K^T) . M) V,          M_ts = exp(b_t - b_s), s <= t
    S_c+1  = exp(b_L) S_c + (K * exp(b_L - b))^T V
Backward with dS_c+1 the gradient of the state leaving the chunk:
    dS_c   = exp(b_L) dS_c+1 + s (Q * exp(b))^T dO
    dQ     = s (dO S_c^T) * exp(b) + s ((dO V^T) . M) K
    dK     = (V dS_c+1^T) * exp(b_L - b) + s ((dO V^T) . M)^T Q
    dV     = (K * exp(b_L - b)) dS_c+1 + s ((Q K^T) . M)^T dO
    dg     = reverse cumsum (per sequence) of  sum_K(q dq) - sum_K(k dk)  (+ <dS_T, S_T> at the end)
Only differences b_t - b_s <= 0 and b_L - b_s <= 0 are exponentiated, so nothing overflows.
The normaliser (`normalize=True`) runs through the same kernels as an extra value column of
ones: its state is z and its output s q z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, chunk_rows, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, dot_precision, register_aot

CHUNK = 64


def _block(size: int, cap: int = 64) -> int:
    """Power-of-two block covering `size`, at least 16 (tl.dot's minimum), at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(size)))


@triton.jit
def _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G: tl.constexpr):
    """(b, b_L): in-chunk inclusive cumulative log-decay [BT] and its total (fp32)."""
    if HAS_G:
        g = tl.load(g_ptr + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b = tl.cumsum(g, axis=0)
        # b_L is the cumsum's own last entry (padded rows add 0), not a separately rounded
        # tl.sum: then exp(b_L - b_t) is exactly 1 at the chunk's last token.
        last = tl.arange(0, rows.shape[0]) == rows.shape[0] - 1
        return b, tl.sum(tl.where(last, b, 0.0), axis=0)
    zero = tl.zeros([rows.shape[0]], dtype=tl.float32)
    return zero, tl.sum(zero, axis=0)


# One program: a [BK, BV] block of one (sequence, head) state, carried across that sequence's
# chunks in order; stores the state entering every chunk (fp32) and, if asked, the final one.
@triton.jit
def _fwd_states_kernel(
    k_ptr, v_ptr, g_ptr, h0_ptr, h_ptr, ht_ptr, cu_ptr, chunk_first_ptr,
    H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_n, i_h = tl.cast(i_nh // H, tl.int64), i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(chunk_first_ptr + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    block = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + (i_n * H + i_h) * K * V + block, mask=m_kv, other=0.0)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        tl.store(h_ptr + ((first + c) * H + i_h) * K * V + block, state, mask=m_kv)
        rows = bos + c * BT + tl.arange(0, BT)
        m_t = rows < eos
        k_t = tl.load(
            k_ptr + (rows[None, :] * H + i_h) * K + o_k[:, None],
            mask=(o_k < K)[:, None] & m_t[None, :],
            other=0.0,
        )  # [BK, BT]
        v = tl.load(
            v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & (o_v < V)[None, :],
            other=0.0,
        )
        b, b_last = _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G)
        if HAS_G:
            k_t = (k_t * tl.exp(b_last - b)[None, :]).to(v.dtype)
            state *= tl.exp(b_last)
        state += tl.dot(k_t, v, input_precision=DOT)
    if STORE_FINAL:
        tl.store(ht_ptr + (i_n * H + i_h) * K * V + block, state, mask=m_kv)


# One program: the [BT, BV] output block of one chunk and head, looping over K blocks.
@triton.jit
def _fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, o_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    h_base = (tl.cast(i_c, tl.int64) * H + i_h) * K * V

    out = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        q = tl.load(
            q_ptr + (rows[:, None] * H + i_h) * K + o_k[None, :],
            mask=m_t[:, None] & m_k[None, :],
            other=0.0,
        )
        k_t = tl.load(
            k_ptr + (rows[None, :] * H + i_h) * K + o_k[:, None],
            mask=m_k[:, None] & m_t[None, :],
            other=0.0,
        )
        h = tl.load(
            h_ptr + h_base + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :] & valid,
            other=0.0,
        )
        out += tl.dot(q, h.to(q.dtype), input_precision=DOT)
        scores += tl.dot(q, k_t, input_precision=DOT)
    b, _ = _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    if HAS_G:
        out *= tl.exp(b)[:, None]
        scores *= tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    v = tl.load(
        v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
        mask=m_t[:, None] & m_v[None, :],
        other=0.0,
    )
    out = (out + tl.dot(scores.to(v.dtype), v, input_precision=DOT)) * scale
    tl.store(
        o_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


# One program: a [BK, BV] block of one (sequence, head) state gradient, carried backwards over
# the chunks; stores the gradient of the state leaving every chunk and, if asked, of S_0.
@triton.jit
def _bwd_states_kernel(
    q_ptr, do_ptr, g_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr, chunk_first_ptr,
    scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_kv, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_n, i_h = tl.cast(i_nh // H, tl.int64), i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(chunk_first_ptr + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    block = o_k[:, None] * V + o_v[None, :]

    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(dht_ptr + (i_n * H + i_h) * K * V + block, mask=m_kv, other=0.0)
    num_chunks = tl.cdiv(eos - bos, BT)
    for j in range(0, num_chunks):
        c = num_chunks - 1 - j
        tl.store(dh_ptr + ((first + c) * H + i_h) * K * V + block, dstate, mask=m_kv)
        rows = bos + c * BT + tl.arange(0, BT)
        m_t = rows < eos
        q_t = tl.load(
            q_ptr + (rows[None, :] * H + i_h) * K + o_k[:, None],
            mask=(o_k < K)[:, None] & m_t[None, :],
            other=0.0,
        ).to(tl.float32)  # [BK, BT]
        do = tl.load(
            do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & (o_v < V)[None, :],
            other=0.0,
        )
        b, b_last = _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G)
        if HAS_G:
            q_t *= tl.exp(b)[None, :]
            dstate *= tl.exp(b_last)
        dstate += tl.dot((q_t * scale).to(do.dtype), do, input_precision=DOT)
    if STORE_DH0:
        tl.store(dh0_ptr + (i_n * H + i_h) * K * V + block, dstate, mask=m_kv)


# One program: dq and dk for a [BT, BK] block of one chunk and head (looping over V blocks),
# plus that block's share of the decay gradient sum_K(q dq - k dk).
@triton.jit
def _bwd_dqk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, dg_part_ptr,
    cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, R, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    h_base = (tl.cast(i_c, tl.int64) * H + i_h) * K * V

    dq = tl.zeros([BT, BK], dtype=tl.float32)
    dk = tl.zeros([BT, BK], dtype=tl.float32)
    dscores = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        m_vk = (o_v < V)[:, None] & m_k[None, :] & valid
        do = tl.load(do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        v = tl.load(v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        h_t = tl.load(h_ptr + h_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)
        dh_t = tl.load(dh_ptr + h_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)
        dq += tl.dot(do, h_t.to(do.dtype), input_precision=DOT)
        dk += tl.dot(v, dh_t.to(v.dtype), input_precision=DOT)
        dscores += tl.dot(do, tl.trans(v), input_precision=DOT)
    b, b_last = _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    if HAS_G:
        dq *= tl.exp(b)[:, None]
        dk *= tl.exp(b_last - b)[:, None]
        dscores *= tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        dscores = tl.where(causal, dscores, 0.0)
    q = tl.load(q_ptr + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    k = tl.load(k_ptr + (rows[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0)
    dscores = (dscores * scale).to(k.dtype)
    dq = dq * scale + tl.dot(dscores, k, input_precision=DOT)
    dk += tl.dot(tl.trans(dscores), q, input_precision=DOT)
    offsets = (rows[:, None] * H + i_h) * K + o_k[None, :]
    tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
    if HAS_G:
        share = tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, axis=1)
        tl.store(dg_part_ptr + (i_k * R + rows) * H + i_h, share, mask=m_t)


# One program: dv for a [BT, BV] block of one chunk and head, looping over K blocks.
@triton.jit
def _bwd_dv_kernel(
    q_ptr, k_ptr, g_ptr, do_ptr, dh_ptr, dv_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, H, K, V,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    h_base = (tl.cast(i_c, tl.int64) * H + i_h) * K * V
    b, b_last = _chunk_decay(g_ptr, rows, m_t, H, i_h, HAS_G)

    dv = tl.zeros([BT, BV], dtype=tl.float32)
    scores_t = tl.zeros([BT, BT], dtype=tl.float32)  # [s, t] = k_s . q_t
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        k = tl.load(
            k_ptr + (rows[:, None] * H + i_h) * K + o_k[None, :],
            mask=m_t[:, None] & m_k[None, :],
            other=0.0,
        )
        q_t = tl.load(
            q_ptr + (rows[None, :] * H + i_h) * K + o_k[:, None],
            mask=m_k[:, None] & m_t[None, :],
            other=0.0,
        )
        dh = tl.load(
            dh_ptr + h_base + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & (o_v < V)[None, :] & valid,
            other=0.0,
        )
        scores_t += tl.dot(k, q_t, input_precision=DOT)
        if HAS_G:
            k = (k * tl.exp(b_last - b)[:, None]).to(q_t.dtype)
        dv += tl.dot(k, dh.to(k.dtype), input_precision=DOT)
    anti_causal = tl.arange(0, BT)[:, None] <= tl.arange(0, BT)[None, :]
    if HAS_G:
        scores_t *= tl.exp(tl.where(anti_causal, b[None, :] - b[:, None], float("-inf")))
    else:
        scores_t = tl.where(anti_causal, scores_t, 0.0)
    do = tl.load(do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    dv += tl.dot((scores_t * scale).to(do.dtype), do, input_precision=DOT)
    tl.store(
        dv_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=m_tv,
    )


# One program: one (sequence, head) and a BV slice of values, token by token with the whole
# [BK, BV] state in registers (decode, and short inference prefills).
@triton.jit
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, cu_ptr,
    scale, H, K, V,
    BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
):  # fmt: skip
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = tl.cast(i_nh // H, tl.int64), i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    block = o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + (i_n * H + i_h) * K * V + block, mask=m_kv, other=0.0)
    for row in range(bos, eos):
        q = tl.load(q_ptr + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + (row * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + (row * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if HAS_G:
            state *= tl.exp(tl.load(g_ptr + row * H + i_h).to(tl.float32))
        state += k[:, None] * v[None, :]
        out = tl.sum(state * q[:, None], axis=0) * scale
        tl.store(o_ptr + (row * H + i_h) * V + o_v, out.to(o_ptr.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht_ptr + (i_n * H + i_h) * K * V + block, state, mask=m_kv)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _states(k, v, g, h0, chunks, output_final):
    """States entering every chunk `[bound, H, K, V]` fp32, and the final states (or None)."""
    _, H, K = k.shape
    V = v.shape[-1]
    BK, BV = _block(K), _block(V)
    h = torch.empty(chunks.bound, H, K, V, dtype=torch.float32, device=k.device)
    ht = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=k.device)
    if not output_final:
        ht = h  # never written
    grid = (triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs * H)
    _fwd_states_kernel[grid](
        k, v, k if g is None else g, k if h0 is None else h0, h, ht, chunks.cu, chunks.first,
        H, K, V, BT=CHUNK, BK=BK, BV=BV,
        HAS_G=g is not None, HAS_H0=h0 is not None, STORE_FINAL=output_final,
        DOT=dot_precision(k.dtype),
    )  # fmt: skip
    return h, (ht if output_final else None)


def _forward(q, k, v, g, h0, chunks, scale, output_final, out_dtype):
    R, H, K = q.shape
    V = v.shape[-1]
    h, ht = _states(k, v, g, h0, chunks, output_final)
    o = torch.empty(R, H, V, dtype=out_dtype, device=q.device)
    BK, BV = _block(K), _block(V)
    _fwd_output_kernel[(triton.cdiv(V, BV), chunks.bound, H)](
        q, k, v, q if g is None else g, h, o, chunks.cu, chunks.seq, chunks.idx,
        scale, H, K, V, BT=CHUNK, BK=BK, BV=BV, HAS_G=g is not None,
        DOT=dot_precision(q.dtype),
    )  # fmt: skip
    return o, ht


SUFFIX_BLOCK = 128  # rows a thread sums in the first level of `_suffix_sums`


def _suffix_sums(x: torch.Tensor) -> torch.Tensor:
    """y_t = sum of x_r over r >= t, along dim 0 of x `[R, H]`, in two levels.

    A cumsum along dim 0 of an `[R, H]` tensor runs H threads down R rows (6 ms of a 10 ms SSD
    forward + backward at R = 32k, H = 24, on an H100). Sums inside blocks of SUFFIX_BLOCK rows,
    then over the blocks' totals, keep R * H / SUFFIX_BLOCK threads busy instead.
    """
    R, H = x.shape
    n = triton.cdiv(R, SUFFIX_BLOCK)
    blocks = F.pad(x, (0, 0, 0, n * SUFFIX_BLOCK - R)).view(n, SUFFIX_BLOCK, H)
    inside = blocks.flip(1).cumsum(1).flip(1)  # [n, SUFFIX_BLOCK, H]
    totals = inside[:, 0]
    later = totals.flip(0).cumsum(0).flip(0) - totals  # the blocks after each one
    return (inside + later[:, None]).view(n * SUFFIX_BLOCK, H)[:R]


def _reverse_cumsum_per_sequence(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """y_t = sum of x_r over r >= t in t's sequence; x `[R, H]` packed by `cu` (no host sync)."""
    # fp64: the difference of two long suffix sums must not cancel away the short one.
    suffix = _suffix_sums(x.double())
    suffix = torch.cat([suffix, suffix.new_zeros(1, x.shape[1])])
    rows = torch.arange(x.shape[0], device=x.device)
    seq = torch.searchsorted(cu[1:].long(), rows, right=True)
    return (suffix[:-1] - suffix[cu[1:].long()[seq]]).to(x.dtype)


class ChunkedLinearAttnFunction(torch.autograd.Function):
    """Packed chunked GLA: q, k `[R, H, K]`, v `[R, H, V]`, g `[R, H]` fp32 or None,
    h0 `[N, H, K, V]` fp32 or None. Returns o `[R, H, V]` and the final state or None."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, cu, fixed_length, scale, output_final, out_dtype):
        chunks = ChunkTable(cu, q.shape[0], fixed_length, CHUNK)
        o, ht = _forward(q, k, v, g, h0, chunks, scale, output_final, out_dtype)
        ctx.save_for_backward(q, k, v, g, h0, cu, ht)
        ctx.fixed_length, ctx.scale = fixed_length, scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, cu, ht = ctx.saved_tensors
        scale = ctx.scale
        chunks = ChunkTable(cu, q.shape[0], ctx.fixed_length, CHUNK)
        R, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _block(K), _block(V)
        # The kernels multiply dO with v in v's dtype (o may be fp32 when normalised).
        do = do.to(v.dtype).contiguous()
        h, _ = _states(k, v, g, h0, chunks, False)
        dh = torch.empty_like(h)
        want_dh0 = h0 is not None and ctx.needs_input_grad[4]
        dh0 = torch.empty(chunks.num_seqs, H, K, V, dtype=torch.float32, device=q.device)
        _bwd_states_kernel[(triton.cdiv(K, BK) * triton.cdiv(V, BV), chunks.num_seqs * H)](
            q, do, q if g is None else g, dh if dht is None else dht.contiguous(), dh, dh0,
            cu, chunks.first, scale, H, K, V, BT=CHUNK, BK=BK, BV=BV,
            HAS_G=g is not None, HAS_DHT=dht is not None, STORE_DH0=want_dh0,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        num_k = triton.cdiv(K, BK)
        dg_part = torch.empty(num_k, R, H, dtype=torch.float32, device=q.device)
        _bwd_dqk_kernel[(num_k, chunks.bound, H)](
            q, k, v, q if g is None else g, h, do, dh, dq, dk, dg_part,
            cu, chunks.seq, chunks.idx, scale, R, H, K, V,
            BT=CHUNK, BK=BK, BV=BV, HAS_G=g is not None,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        _bwd_dv_kernel[(triton.cdiv(V, BV), chunks.bound, H)](
            q, k, q if g is None else g, do, dh, dv, cu, chunks.seq, chunks.idx,
            scale, H, K, V, BT=CHUNK, BK=BK, BV=BV, HAS_G=g is not None,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dlog = dg_part.sum(0)
            if dht is not None and R > 0:  # (no rows: nowhere to add, and nothing to add)
                # S_T depends on the decay up to the last token: d<dS_T, S_T>/dB_T = <dS_T, S_T>.
                lengths = cu[1:] - cu[:-1]
                last = (cu[1:].long() - 1).clamp(min=0)
                end_term = (dht * ht).sum((-1, -2)) * (lengths > 0).unsqueeze(1)
                dlog = dlog.index_add(0, last, end_term)
            dg = _reverse_cumsum_per_sequence(dlog, cu)
        return dq, dk, dv, dg, (dh0 if want_dh0 else None), None, None, None, None, None


def _recurrent(q, k, v, g, h0, cu, scale, output_final, out_dtype):
    """Token-by-token kernel on packed rows; returns (o `[R, H, V]`, final state or None)."""
    R, H, K = q.shape
    V = v.shape[-1]
    num_seqs = cu.numel() - 1
    BK = triton.next_power_of_2(K)
    BV = max(1, min(triton.next_power_of_2(V), 4096 // BK))  # state block <= 4096 floats
    o = torch.empty(R, H, V, dtype=out_dtype, device=q.device)
    ht = torch.empty(num_seqs, H, K, V, dtype=torch.float32, device=q.device)
    _recurrent_kernel[(triton.cdiv(V, BV), num_seqs * H)](
        q, k, v, q if g is None else g, q if h0 is None else h0, o, ht, cu,
        scale, H, K, V, BK=BK, BV=BV,
        HAS_G=g is not None, HAS_H0=h0 is not None, STORE_FINAL=output_final,
    )  # fmt: skip
    return o, (ht if output_final else None)


# Inference on at most this many tokens per sequence runs the recurrent kernel.
RECURRENT_MAX_T = 16


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def linear_attn_triton(
    q, k, v, *, g, scale, normalize, eps, initial_state, output_final_state, cu_seqlens
):
    """Triton gated linear attention; same contract as `memzoo.kernels.linear_attn.linear_attn`
    (inputs already checked and contiguous)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cu, fixed_length = packed_offsets(B, T, cu_seqlens, q.device)
    q, k, v = (t.reshape(B * T, H, t.shape[-1]) for t in (q, k, v))
    g = None if g is None else g.reshape(B * T, H).float()
    h0 = initial_state
    if normalize:
        # The normaliser z is one more value column whose inputs are all ones.
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        if h0 is not None:
            h0 = torch.cat([h0[0].float(), h0[1].float().unsqueeze(-1)], dim=-1)
    h0 = None if h0 is None else h0.float().contiguous()
    # Feature counts like Taylor's 273 leave q/k rows misaligned for the tensor-core loads
    # (bf16 at K=273 faulted in the backward on an H200 while K=64 ran): zero features up to
    # a multiple of 16 change no product, and autograd crops their gradients.
    pad = -K % 16
    if pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        h0 = None if h0 is None else F.pad(h0, (0, 0, 0, pad))
    out_dtype = torch.float32 if normalize else v.dtype

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, h0)
    )
    if not needs_grad and fixed_length is not None and T <= RECURRENT_MAX_T:
        o, ht = _recurrent(q, k, v, g, h0, cu, scale, output_final_state, out_dtype)
    else:
        o, ht = ChunkedLinearAttnFunction.apply(
            q, k, v, g, h0, cu, fixed_length, scale, output_final_state, out_dtype
        )
    if ht is not None and pad:
        ht = ht[:, :, :K]
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
        if ht is not None:
            ht = (ht[..., :V], ht[..., V])
    return o.reshape(B, T, H, V).to(v.dtype), ht


def linear_attn_step_triton(q, k, v, state, *, g, scale, normalize, eps):
    """One decode step through the recurrent kernel; contract of `linear_attn_step`."""
    o, new_state = linear_attn_triton(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
        g=None if g is None else g.unsqueeze(1), scale=scale, normalize=normalize, eps=eps,
        initial_state=state, output_final_state=True, cu_seqlens=None,
    )  # fmt: skip
    return o.squeeze(1), new_state


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16 inputs, fp32 states) at the head sizes models use
# --------------------------------------------------------------------------------------


# Launch types of the AOT specs: bf16 activations, int32 offsets, fp32 states and scalars.
AOT_TYPES = {
    **{f"{n}_ptr": "*bf16" for n in ("q", "k", "v", "do", "o", "dq", "dk", "dv")},
    **{f"{n}_ptr": "*i32" for n in ("cu", "chunk_seq", "chunk_idx", "chunk_first")},
    "scale": "fp32",
}


def _aot(name, kernel, constexprs, *, num_warps=4):
    signature = aot_signature(kernel, constexprs, AOT_TYPES)
    register_aot(
        AotSpec(
            name=name, kernel=kernel, signature=signature, constexprs=constexprs,
            num_warps=num_warps, multiple_of_16=("K", "V"),
        )
    )  # fmt: skip


def _register_aot_specs() -> None:
    # (64, 64) and (128, 64) are Mamba-2 (SSD) heads: K = d_state, V = headdim.
    for K, V in ((16, 64), (64, 64), (128, 64), (128, 128)):
        blocks = {"BT": CHUNK, "BK": _block(K), "BV": _block(V), "HAS_G": True}
        tag = f"K{K}-V{V}"
        _aot(
            f"gla_fwd_states-{tag}",
            _fwd_states_kernel,
            {**blocks, "HAS_H0": True, "STORE_FINAL": True},
        )
        _aot(f"gla_fwd_output-{tag}", _fwd_output_kernel, blocks)
        _aot(
            f"gla_bwd_states-{tag}",
            _bwd_states_kernel,
            {**blocks, "HAS_DHT": True, "STORE_DH0": True},
        )
        _aot(f"gla_bwd_dqk-{tag}", _bwd_dqk_kernel, blocks)
        _aot(f"gla_bwd_dv-{tag}", _bwd_dv_kernel, blocks)
        BK = triton.next_power_of_2(K)
        _aot(f"gla_recurrent-{tag}", _recurrent_kernel,
             {"BK": BK, "BV": min(triton.next_power_of_2(V), 4096 // BK), "HAS_G": True,
              "HAS_H0": True, "STORE_FINAL": True})  # fmt: skip


_register_aot_specs()
