"""Triton flash attention: causal / sliding-window / full, grouped-query heads, packed sequences.

Rows are packed (`[R, H, D]` with int32 offsets `cu`, see `memzoo.kernels._chunks`); queries
and keys are cut into blocks of BM / BN rows that never cross a sequence boundary. Query i may
see key j of its own sequence when (not causal) or j <= i, and with a window w also j > i - w.
Each program visits only the key (or query) blocks its mask can reach, so a window costs
O(T * w), not O(T^2).

Forward (online softmax, fp32 accumulation, base-2 exponentials):
    s = q k^T * scale * log2(e);  m = running max;  l = running sum of 2^(s - m)
    o = sum 2^(s - m) v / l,  lse = m + log2(l)   (stored per row and head for the backward)
Backward with p = 2^(s - lse) and delta = rowsum(dO * O):
    dv = p^T dO,  ds = p * (dO v^T - delta),  dq = ds k * scale,  dk = ds^T q * scale
dk/dv programs own one key block of one kv head and loop over the query heads that share it
(grouped-query attention), so no gradient is written twice.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, chunk_rows, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, dot_precision, register_aot

LOG2E = math.log2(math.e)


def _blocks(D: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, BD, num_warps): query/key rows per block, the padded head dim, warps.

    The backward holds more tiles per program (q, k, v, dO, p, ds and two accumulators): it
    gets twice the warps and half the key rows, which the AOT check shows free of spills on
    sm_80 and sm_90 at D = 64 and 128.
    """
    BD = max(16, triton.next_power_of_2(D))
    rows = 64 if BD <= 64 else 32
    if backward:
        return rows, max(16, rows // 2), BD, 8
    return rows, rows, BD, 4


@triton.jit
def _allowed(rows_q, rows_k, m_q, m_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[len(rows_q), len(rows_k)] mask of the pairs attention may use."""
    ok = m_q[:, None] & m_k[None, :]
    if CAUSAL:
        ok = ok & (rows_k[None, :] <= rows_q[:, None])
    if HAS_WINDOW:
        ok = ok & (rows_k[None, :] > rows_q[:, None] - window)
    return ok


@triton.jit
def _key_range(q_first, q_last, bos, eos, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the keys some query in [q_first, q_last] may see."""
    lo = bos
    hi = eos
    if CAUSAL:
        hi = tl.minimum(eos, q_last + 1)
    if HAS_WINDOW:
        lo = tl.maximum(bos, q_first - window + 1)
    return lo, hi


@triton.jit
def _query_range(k_first, k_last, bos, eos, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of the queries that may see some key in [k_first, k_last]."""
    lo = bos
    hi = eos
    if CAUSAL:
        lo = tl.maximum(bos, k_first)
    if HAS_WINDOW:
        hi = tl.minimum(eos, k_last + window)
    return lo, hi


# One program: a block of BM queries of one head; online softmax over the keys it may see.
@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, window, H, HKV, D,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HKV)
    rows_q, m_q, valid, bos, eos = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_m, BM)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    q = tl.load(
        q_ptr + (rows_q[:, None] * H + i_h) * D + o_d[None, :],
        mask=m_q[:, None] & m_d[None, :],
        other=0.0,
    )
    q_last = tl.max(tl.where(m_q, rows_q, bos), axis=0)
    lo, hi = _key_range(tl.min(rows_q, axis=0), q_last, bos, eos, window, CAUSAL, HAS_WINDOW)
    hi = tl.where(valid, hi, lo)  # surplus table entries visit nothing

    row_max = tl.full([BM], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for start in range(lo, hi, BN):
        rows_k = start + tl.arange(0, BN)
        m_k = rows_k < hi
        k = tl.load(
            k_ptr + (rows_k[:, None] * HKV + i_hk) * D + o_d[None, :],
            mask=m_k[:, None] & m_d[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + (rows_k[:, None] * HKV + i_hk) * D + o_d[None, :],
            mask=m_k[:, None] & m_d[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * (scale * 1.4426950408889634)
        s = tl.where(
            _allowed(rows_q, rows_k, m_q, m_k, window, CAUSAL, HAS_WINDOW), s, float("-inf")
        )
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # Rows that have seen no key yet keep -inf; subtract 0 there instead of -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        row_max = new_max
    safe_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    tl.store(
        o_ptr + (rows_q[:, None] * H + i_h) * D + o_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_q[:, None] & m_d[None, :],
    )
    tl.store(lse_ptr + rows_q * H + i_h, row_max + tl.log2(safe_sum), mask=m_q)


# One program: dq for a block of BM queries of one head, looping over the keys it may see.
@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, window, H, HKV, D,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (H // HKV)
    rows_q, m_q, valid, bos, eos = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_m, BM)
    o_d = tl.arange(0, BD)
    m_qd = m_q[:, None] & (o_d < D)[None, :]
    offsets = (rows_q[:, None] * H + i_h) * D + o_d[None, :]
    q = tl.load(q_ptr + offsets, mask=m_qd, other=0.0)
    do = tl.load(do_ptr + offsets, mask=m_qd, other=0.0)
    lse = tl.load(lse_ptr + rows_q * H + i_h, mask=m_q, other=0.0)
    delta = tl.load(delta_ptr + rows_q * H + i_h, mask=m_q, other=0.0)
    q_last = tl.max(tl.where(m_q, rows_q, bos), axis=0)
    lo, hi = _key_range(tl.min(rows_q, axis=0), q_last, bos, eos, window, CAUSAL, HAS_WINDOW)
    hi = tl.where(valid, hi, lo)  # surplus table entries visit nothing

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    for start in range(lo, hi, BN):
        rows_k = start + tl.arange(0, BN)
        m_k = rows_k < hi
        m_kd = m_k[:, None] & (o_d < D)[None, :]
        k = tl.load(k_ptr + (rows_k[:, None] * HKV + i_hk) * D + o_d[None, :], mask=m_kd, other=0.0)
        v = tl.load(v_ptr + (rows_k[:, None] * HKV + i_hk) * D + o_d[None, :], mask=m_kd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT) * (scale * 1.4426950408889634)
        allowed = _allowed(rows_q, rows_k, m_q, m_k, window, CAUSAL, HAS_WINDOW)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    tl.store(dq_ptr + offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_qd)


# One program: dk, dv for a block of BN keys of one kv head, summed over the query heads that
# share it and over the queries that may see the block.
@triton.jit
def _bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale, window, H, HKV, D,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_n, i_hk = tl.program_id(0), tl.program_id(1)
    rows_k, m_k, valid, bos, eos = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_n, BN)
    o_d = tl.arange(0, BD)
    m_kd = m_k[:, None] & (o_d < D)[None, :]
    kv_offsets = (rows_k[:, None] * HKV + i_hk) * D + o_d[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=m_kd, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=m_kd, other=0.0)
    k_last = tl.max(tl.where(m_k, rows_k, bos), axis=0)
    lo, hi = _query_range(tl.min(rows_k, axis=0), k_last, bos, eos, window, CAUSAL, HAS_WINDOW)
    hi = tl.where(valid, hi, lo)

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    group = H // HKV
    for i_g in range(0, group):
        i_h = i_hk * group + i_g
        for start in range(lo, hi, BM):
            rows_q = start + tl.arange(0, BM)
            m_q = rows_q < hi
            m_qd = m_q[:, None] & (o_d < D)[None, :]
            offsets = (rows_q[:, None] * H + i_h) * D + o_d[None, :]
            q = tl.load(q_ptr + offsets, mask=m_qd, other=0.0)
            do = tl.load(do_ptr + offsets, mask=m_qd, other=0.0)
            lse = tl.load(lse_ptr + rows_q * H + i_h, mask=m_q, other=0.0)
            delta = tl.load(delta_ptr + rows_q * H + i_h, mask=m_q, other=0.0)
            # scores transposed, keys x queries: [BN, BM]
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT) * (scale * 1.4426950408889634)
            allowed_t = tl.trans(_allowed(rows_q, rows_k, m_q, m_k, window, CAUSAL, HAS_WINDOW))
            p_t = tl.where(allowed_t, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT)
            ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT) - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT)
    tl.store(dk_ptr + kv_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=m_kd)
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=m_kd)


def _flags(causal: bool, window: int | None) -> dict:
    return {"CAUSAL": causal, "HAS_WINDOW": window is not None}


class FlashAttentionFunction(torch.autograd.Function):
    """Packed attention: q `[R, H, D]`, k/v `[R, Hkv, D]`, offsets cu `[N + 1]`."""

    @staticmethod
    def forward(ctx, q, k, v, cu, fixed_length, scale, causal, window):
        R, H, D = q.shape
        BM, BN, BD, num_warps = _blocks(D)
        queries = ChunkTable(cu, R, fixed_length, BM)
        o = torch.empty_like(q)
        lse = torch.empty(R, H, dtype=torch.float32, device=q.device)
        _fwd_kernel[(queries.bound, H)](
            q, k, v, o, lse, cu, queries.seq, queries.idx,
            scale, window or 0, H, k.shape[1], D,
            BM=BM, BN=BN, BD=BD, **_flags(causal, window), num_warps=num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.fixed_length, ctx.scale, ctx.causal, ctx.window = fixed_length, scale, causal, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        R, H, D = q.shape
        HKV = k.shape[1]
        BM, BN, BD, num_warps = _blocks(D, backward=True)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        window, flags = ctx.window or 0, _flags(ctx.causal, ctx.window)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        queries = ChunkTable(cu, R, ctx.fixed_length, BM)
        _bwd_dq_kernel[(queries.bound, H)](
            q, k, v, do, lse, delta, dq, cu, queries.seq, queries.idx,
            ctx.scale, window, H, HKV, D, BM=BM, BN=BN, BD=BD, **flags, num_warps=num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        keys = ChunkTable(cu, R, ctx.fixed_length, BN)
        _bwd_dkv_kernel[(keys.bound, HKV)](
            q, k, v, do, lse, delta, dk, dv, cu, keys.seq, keys.idx,
            ctx.scale, window, H, HKV, D, BM=BM, BN=BN, BD=BD, **flags, num_warps=num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def attention_triton(q, k, v, *, causal, window, scale, cu_seqlens):
    """Triton attention; contract of `memzoo.kernels.attention.attention` (inputs checked,
    contiguous, scale a float)."""
    B, T, H, D = q.shape
    cu, fixed_length = packed_offsets(B, T, cu_seqlens, q.device)
    if window is not None and window >= T:
        window = None  # the whole causal past fits: plain causal attention
    packed = (t.reshape(B * T, t.shape[2], D) for t in (q, k, v))
    o = FlashAttentionFunction.apply(*packed, cu, fixed_length, scale, causal, window)
    return o.reshape(B, T, H, D)


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16) at the head dims models use
# --------------------------------------------------------------------------------------

AOT_TYPES = {
    **{f"{n}_ptr": "*bf16" for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")},
    **{f"{n}_ptr": "*i32" for n in ("cu", "chunk_seq", "chunk_idx")},
    "scale": "fp32",
}


def _register_aot_specs() -> None:
    kernels = {"fwd": _fwd_kernel, "bwd_dq": _bwd_dq_kernel, "bwd_dkv": _bwd_dkv_kernel}
    for D in (64, 128):
        for window in (False, True):
            for name, kernel in kernels.items():
                BM, BN, BD, num_warps = _blocks(D, backward=name != "fwd")
                constexprs = {"BM": BM, "BN": BN, "BD": BD, "CAUSAL": True, "HAS_WINDOW": window}
                register_aot(
                    AotSpec(
                        name=f"attn_{name}-D{D}{'-window' if window else ''}",
                        kernel=kernel,
                        signature=aot_signature(kernel, constexprs, AOT_TYPES),
                        constexprs=constexprs,
                        num_warps=num_warps,
                        multiple_of_16=("D",),
                    )
                )


_register_aot_specs()
