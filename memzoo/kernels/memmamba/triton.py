"""Triton note attention: a banded softmax attention over the compacted note sequence.

Rows of every batch entry are packed (queries `[R, H, D]`, notes `[RN, H, D]` with entry b's
notes at ranks `b * S ...`), and each query carries its visible rank range `[lo, hi)` (global
ranks, built by the wrapper from counts, capacity and cu_seqlens). Both bounds are
non-decreasing along the packed rows, which is all the kernels rely on:
- a block of queries only visits the notes `[min lo, max hi)`, at most K + BM of them inside
  one sequence, so the cost is O(T (K + BM)) rather than O(T S);
- the queries that see a block of notes form one contiguous range, found per note by a binary
  search on the device (`q_first[r]` = first query with hi > r, `q_end[r]` = first with lo > r).

Forward (online softmax, fp32 accumulation, base-2 exponentials; a query with no visible
note gets o = 0 and lse = -inf):
    s = q k^T * scale * log2(e);  o = sum 2^(s - lse2) v;  lse2 = log2 sum 2^s
Backward with p = 2^(s - lse2), delta = rowsum(dO * O) - dlse (dlse: the gradient of the
natural-log lse output, nonzero when reads of several pools are merged through it):
    dv = p^T dO,  ds = p * (dO v^T - delta),  dq = ds k * scale,  dk = ds^T q * scale
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memzoo.kernels._core import AotSpec, aot_signature, dot_precision, register_aot
from memzoo.kernels.memmamba.reference import visible_range

LN2 = math.log(2.0)


def _blocks(D: int, DV: int, backward: bool = False) -> tuple[int, int, int, int, int]:
    """(BM, BN, BD, BDV, num_warps): query rows, note rows, padded head dims, warps.

    The backward holds more tiles (q, k, v, dO, p, ds and two accumulators): half the note
    rows and, from head dim 64 on, twice the warps, as in the attention kernels. At head dims
    up to 32, ptxas spills the dk/dv kernel with 8 warps on sm_80 but not with 4.
    """
    BD = max(16, triton.next_power_of_2(D))
    BDV = max(16, triton.next_power_of_2(DV))
    rows = 64 if max(BD, BDV) <= 64 else 32
    if backward:
        return rows, max(16, rows // 2), BD, BDV, 8 if max(BD, BDV) >= 64 else 4
    return rows, rows, BD, BDV, 4


@triton.jit
def _query_block(hi_ptr, lo_ptr, i_m, R, BM: tl.constexpr):
    """(rows [BM] int64, row mask, lo [BM], hi [BM], band start, band end) of query block i_m.

    Rows past the end repeat the last row's bounds, so they never widen the band.
    """
    rows = tl.cast(i_m, tl.int64) * BM + tl.arange(0, BM)
    m_q = rows < R
    clamped = tl.minimum(rows, R - 1)
    lo = tl.load(lo_ptr + clamped).to(tl.int64)
    hi = tl.load(hi_ptr + clamped).to(tl.int64)
    return rows, m_q, lo, hi, tl.min(lo, axis=0), tl.max(hi, axis=0)


# One program: a block of BM queries of one head; online softmax over its band of notes.
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, hi_ptr, lo_ptr, o_ptr, lse_ptr,
    scale, R, H, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_q, lo, hi, band_lo, band_hi = _query_block(hi_ptr, lo_ptr, i_m, R, BM)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    q = tl.load(
        q_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :],
        mask=m_q[:, None] & m_d[None, :],
        other=0.0,
    )

    row_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    for start in range(band_lo, band_hi, BN):
        ranks = start + tl.arange(0, BN)
        m_n = ranks < band_hi
        k = tl.load(
            k_ptr + (ranks[:, None] * H + i_h) * D + o_d[None, :],
            mask=m_n[:, None] & m_d[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + (ranks[:, None] * H + i_h) * DV + o_dv[None, :],
            mask=m_n[:, None] & m_dv[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * (scale * 1.4426950408889634)
        visible = m_q[:, None] & (ranks[None, :] >= lo[:, None]) & (ranks[None, :] < hi[:, None])
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # Rows that have seen no note yet keep -inf; subtract 0 there instead of -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        row_max = new_max
    safe_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    tl.store(
        o_ptr + (rows[:, None] * H + i_h) * DV + o_dv[None, :],
        (acc / safe_sum[:, None]).to(o_ptr.dtype.element_ty),
        mask=m_q[:, None] & m_dv[None, :],
    )
    tl.store(lse_ptr + rows * H + i_h, row_max + tl.log2(safe_sum), mask=m_q)


# One program: dq for a block of BM queries of one head, over the same band of notes.
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, hi_ptr, lo_ptr, dq_ptr,
    scale, R, H, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_q, lo, hi, band_lo, band_hi = _query_block(hi_ptr, lo_ptr, i_m, R, BM)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    m_qd = m_q[:, None] & m_d[None, :]
    q = tl.load(q_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :], mask=m_qd, other=0.0)
    do = tl.load(
        do_ptr + (rows[:, None] * H + i_h) * DV + o_dv[None, :],
        mask=m_q[:, None] & m_dv[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + rows * H + i_h, mask=m_q, other=0.0)
    delta = tl.load(delta_ptr + rows * H + i_h, mask=m_q, other=0.0)

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    for start in range(band_lo, band_hi, BN):
        ranks = start + tl.arange(0, BN)
        m_n = ranks < band_hi
        k = tl.load(
            k_ptr + (ranks[:, None] * H + i_h) * D + o_d[None, :],
            mask=m_n[:, None] & m_d[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + (ranks[:, None] * H + i_h) * DV + o_dv[None, :],
            mask=m_n[:, None] & m_dv[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * (scale * 1.4426950408889634)
        visible = m_q[:, None] & (ranks[None, :] >= lo[:, None]) & (ranks[None, :] < hi[:, None])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    tl.store(
        dq_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=m_qd,
    )


# One program: dk, dv for a block of BN notes of one head, over the queries that see any of them.
@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, hi_ptr, lo_ptr, q_first_ptr, q_end_ptr,
    dk_ptr, dv_ptr,
    scale, R, RN, H, D, DV,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    ranks = tl.cast(i_n, tl.int64) * BN + tl.arange(0, BN)
    m_n = ranks < RN
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_d, m_dv = o_d < D, o_dv < DV
    k = tl.load(
        k_ptr + (ranks[:, None] * H + i_h) * D + o_d[None, :],
        mask=m_n[:, None] & m_d[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + (ranks[:, None] * H + i_h) * DV + o_dv[None, :],
        mask=m_n[:, None] & m_dv[None, :],
        other=0.0,
    )
    first_rank = tl.cast(i_n, tl.int64) * BN
    last_rank = tl.minimum(first_rank + BN, RN) - 1
    q_lo = tl.load(q_first_ptr + first_rank).to(tl.int64)
    q_hi = tl.load(q_end_ptr + last_rank).to(tl.int64)

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for start in range(q_lo, q_hi, BM):
        rows = start + tl.arange(0, BM)
        m_q = rows < q_hi
        q = tl.load(
            q_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :],
            mask=m_q[:, None] & m_d[None, :],
            other=0.0,
        )
        do = tl.load(
            do_ptr + (rows[:, None] * H + i_h) * DV + o_dv[None, :],
            mask=m_q[:, None] & m_dv[None, :],
            other=0.0,
        )
        lse = tl.load(lse_ptr + rows * H + i_h, mask=m_q, other=0.0)
        delta = tl.load(delta_ptr + rows * H + i_h, mask=m_q, other=0.0)
        lo = tl.load(lo_ptr + rows, mask=m_q, other=0).to(tl.int64)
        hi = tl.load(hi_ptr + rows, mask=m_q, other=0).to(tl.int64)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT) * (scale * 1.4426950408889634)  # [BN, BM]
        in_band = (ranks[:, None] >= lo[None, :]) & (ranks[:, None] < hi[None, :])
        visible_t = m_n[:, None] & m_q[None, :] & in_band
        p_t = tl.where(visible_t, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT)
    tl.store(
        dk_ptr + (ranks[:, None] * H + i_h) * D + o_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=m_n[:, None] & m_d[None, :],
    )
    tl.store(
        dv_ptr + (ranks[:, None] * H + i_h) * DV + o_dv[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=m_n[:, None] & m_dv[None, :],
    )


class NoteAttentionFunction(torch.autograd.Function):
    """Packed note attention: q `[R, H, D]`, k `[RN, H, D]`, v `[RN, H, Dv]`, per-query global
    rank bounds hi, lo `[R]` int32 (non-decreasing). Returns o `[R, H, Dv]`, lse `[R, H]` (fp32,
    natural log)."""

    @staticmethod
    def forward(ctx, q, k, v, hi, lo, scale):
        R, H, D = q.shape
        DV = v.shape[-1]
        BM, BN, BD, BDV, num_warps = _blocks(D, DV)
        o = torch.empty(R, H, DV, dtype=q.dtype, device=q.device)
        lse2 = torch.empty(R, H, dtype=torch.float32, device=q.device)
        if R > 0:
            _fwd_kernel[(triton.cdiv(R, BM), H)](
                q, k, v, hi, lo, o, lse2, scale, R, H, D, DV,
                BM=BM, BN=BN, BD=BD, BDV=BDV, num_warps=num_warps,
                DOT=dot_precision(q.dtype),
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse2, hi, lo)
        ctx.scale = scale
        return o, lse2 * LN2

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse2, hi, lo = ctx.saved_tensors
        R, H, D = q.shape
        RN, DV = k.shape[0], v.shape[-1]
        BM, BN, BD, BDV, num_warps = _blocks(D, DV, backward=True)
        do = torch.zeros_like(o) if do is None else do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if R > 0:
            _bwd_dq_kernel[(triton.cdiv(R, BM), H)](
                q, k, v, do, lse2, delta, hi, lo, dq, ctx.scale, R, H, D, DV,
                BM=BM, BN=BN, BD=BD, BDV=BDV, num_warps=num_warps,
                DOT=dot_precision(q.dtype),
            )  # fmt: skip
        if RN > 0:
            # Both bounds are sorted, so the queries that see note r are one range, found on
            # the device: [first query with hi > r, first query with lo > r).
            ranks = torch.arange(RN, dtype=hi.dtype, device=hi.device)
            q_first = torch.searchsorted(hi, ranks, right=True).to(torch.int32)
            q_end = torch.searchsorted(lo, ranks, right=True).to(torch.int32)
            _bwd_dkv_kernel[(triton.cdiv(RN, BN), H)](
                q, k, v, do, lse2, delta, hi, lo, q_first, q_end, dk, dv,
                ctx.scale, R, RN, H, D, DV,
                BM=BM, BN=BN, BD=BD, BDV=BDV, num_warps=num_warps,
                DOT=dot_precision(q.dtype),
            )  # fmt: skip
        return dq, dk, dv, None, None, None


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def note_attention_triton(q, k, v, counts, capacity, scale, cu_seqlens):
    """Triton note attention; contract of `memzoo.kernels.memmamba.note_attention` (inputs
    checked and contiguous). Returns (o `[B, T, H, Dv]`, lse `[B, T, H]` fp32)."""
    B, T, H, D = q.shape
    S, DV = k.shape[1], v.shape[-1]
    # Entry b's notes start at rank b * S of the packed note rows.
    offsets = (torch.arange(B, device=q.device) * S)[:, None]
    hi = (counts.long() + offsets).reshape(-1).to(torch.int32)
    lo = (visible_range(counts, capacity, cu_seqlens) + offsets).reshape(-1).to(torch.int32)
    o, lse = NoteAttentionFunction.apply(
        q.reshape(B * T, H, D), k.reshape(B * S, H, D), v.reshape(B * S, H, DV), hi, lo, scale
    )
    return o.reshape(B, T, H, DV), lse.reshape(B, T, H)


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16) at the note head dims the layer uses
# --------------------------------------------------------------------------------------

AOT_TYPES = {
    **{f"{n}_ptr": "*bf16" for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")},
    **{f"{n}_ptr": "*i32" for n in ("hi", "lo", "q_first", "q_end")},
    "scale": "fp32",
}


def _register_aot_specs() -> None:
    kernels = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkv": _bwd_dkv_kernel}
    for D in (16, 32, 64, 128):
        for name, kernel in kernels.items():
            BM, BN, BD, BDV, num_warps = _blocks(D, D, backward=name != "fwd")
            constexprs = {"BM": BM, "BN": BN, "BD": BD, "BDV": BDV}
            register_aot(
                AotSpec(
                    name=f"note_attn_{name}-D{D}",
                    kernel=kernel,
                    signature=aot_signature(kernel, constexprs, AOT_TYPES),
                    constexprs=constexprs,
                    num_warps=num_warps,
                    multiple_of_16=("D", "DV"),
                )
            )


_register_aot_specs()
