"""Triton kernels for fused BASED attention: the Taylor feature map is built on chip.

BASED is normalised linear attention on the full second-order Taylor map of d = 16 features,
    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]               F = 273 features
    phi(q)·phi(k) = 1 + s + s^2 / 2,  s = q·k / sqrt(d)
    o_t = phi(q_t) S_t / (phi(q_t) z_t + eps),  S_t = sum_{r<=t} phi(k_r)^T v_r,  z_t = sum phi(k_r)
The unfused path materialises phi(q), phi(k) `[B, T, H, 273]` and runs `linear_attn`; the
kernels here read only the raw 16-dim q, k.

Feature layout. Row 0 is the constant 1; rows 1 + 16 m + j (sub-block m = 0..16) are w_m x_j
with w_0 = d^(-1/4) (order 1) and w_m = x_{m-1} / sqrt(2 d) (order 2, vec(x x^T) row m - 1).
The kernels walk rows 1..272 in feature blocks of FB rows (FB / 16 sub-blocks; the last block
is partly masked) and build a block's [BT, FB] features in registers as the outer product of
its weights [BT, FB / 16] with the raw x [BT, 16]. States are kept in this layout, scales
included, so they are exactly `linear_attn`'s (S, z) on the "taylor" map: a based_attn
prefill continues with `linear_attn_step` on taylor features and vice versa.

Per chunk of BT tokens (state S_c, z_c entering it):
- intra-chunk: scores A = (1 + s + s^2 / 2) . M (M causal) from one raw `q k^T`;
  numerator A V, denominator rowsum(A).
- inter-chunk: phi(q) S_c = S_c[0] + sum over feature blocks of phi_b(q) S_c[block b].
Backward, with r = 1 / (den + eps), delta = rowsum(dO . O) and dden = -delta r:
    dnum = r dO,  dS_c = dS_c+1 + phi(Q)^T dnum,  dz_c = dz_c+1 + phi(Q)^T dden
    dA = (dnum V^T + dden) . M,  ds = dA . (1 + s) / sqrt(d),  dq += ds K,  dk += ds^T Q
    dphi(q_t) = dnum_t S_c^T + dden_t z_c,  dphi(k_s) = v_s dS_c+1^T + dz_c+1
    dV = A^T dnum + phi(K) dS_c+1
and a feature block's gradient G [BT, FB] (G[m, j] the row of w_m x_j) goes back to the 16
raw dims in registers by the chain rule
    dx_n = sum_m w_m G[m, n] + sum_j x_j G[n + 1, j] / sqrt(2 d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, chunk_rows, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, dot_precision, register_aot
from memzoo.kernels.linear_attn.based import FEATURE_DIM, NUM_FEATURES
from memzoo.kernels.linear_attn.triton import AOT_TYPES, CHUNK, _block


@triton.jit
def _taylor_weights(
    x_ptr, rows, m_t, H, i_h, i_b, D: tl.constexpr, FB: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """w [BT, FB // D] ([FB // D, BT] if TRANSPOSED): the weight of each sub-block m of feature
    block i_b for rows [BT] of raw x `[R, H, D]`: d^(-1/4) for m = 0, x[:, m - 1] / sqrt(2 d)
    for m = 1..D, 0 past them."""
    m = i_b * (FB // D) + tl.arange(0, FB // D)
    if TRANSPOSED:
        col = tl.load(
            x_ptr + (rows[None, :] * H + i_h) * D + tl.maximum(m - 1, 0)[:, None],
            mask=m_t[None, :] & (m <= D)[:, None],
            other=0.0,
        )
        order1 = (m == 0)[:, None]
    else:
        col = tl.load(
            x_ptr + (rows[:, None] * H + i_h) * D + tl.maximum(m - 1, 0)[None, :],
            mask=m_t[:, None] & (m <= D)[None, :],
            other=0.0,
        )
        order1 = (m == 0)[None, :]
    return tl.where(order1, D**-0.25, col.to(tl.float32) * (2 * D) ** -0.5)


@triton.jit
def _taylor_block(x, w, FB: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Features of one block, phi[:, m D + j] = w[:, m] x[:, j]: [BT, FB] from x [BT, D] fp32,
    or [FB, BT] from x [D, BT] and w [FB // D, BT] if TRANSPOSED (the operand of phi^T V)."""
    if TRANSPOSED:
        return tl.reshape(w[:, None, :] * x[None, :, :], [FB, x.shape[1]])
    else:
        return tl.reshape(w[:, :, None] * x[:, None, :], [x.shape[0], FB])


@triton.jit
def _taylor_block_grad(g, x, w, i_b, D: tl.constexpr, FB: tl.constexpr, DOT: tl.constexpr):
    """[BT, D] gradient of the raw x from G = dL/dphi [BT, FB] of feature block i_b:
    sum_m w_m G[:, m D + j] (through x_j) plus sum_j x_j G[:, m D + j] / sqrt(2 d) into column
    m - 1 (through w_m = x_(m-1) / sqrt(2 d)).

    Both sums are products with 0/1 matrices [FB, D], so G, a tl.dot result, is never
    reshaped: reshaping it to [BT, FB // D, D] and reducing gave wrong gradients on an H200
    (Triton 3.6) while the interpreter agreed with the reference.
    """
    w_wide = _taylor_block(tl.full(x.shape, 1.0, tl.float32), w, FB, False)  # w[:, m] at m D + j
    x_wide = _taylor_block(x, tl.full(w.shape, 1.0, tl.float32), FB, False)  # x[:, j] at m D + j
    column = tl.arange(0, FB)
    out = tl.arange(0, D)[None, :]
    to_j = ((column % D)[:, None] == out).to(tl.float32)
    to_m = ((i_b * (FB // D) + column // D - 1)[:, None] == out).to(tl.float32)
    through_x = tl.dot(g * w_wide, to_j, input_precision=DOT)
    through_w = tl.dot(g * x_wide, to_m, input_precision=DOT)
    return through_x + (2 * D) ** -0.5 * through_w


# One program: one feature block (plus row 0 in block 0) of one (sequence, head) state and a
# BV slice of values, carried across the sequence's chunks; stores the state entering every
# chunk (fp32, feature layout) and, if asked, the final one. V block 0 also carries z.
@triton.jit
def _fwd_states_kernel(
    k_ptr, v_ptr, s0_ptr, z0_ptr, h_ptr, hz_ptr, st_ptr, zt_ptr, cu_ptr, chunk_first_ptr,
    H, V,
    D: tl.constexpr, F: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_bv, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_b, i_v = i_bv // NV, i_bv % NV
    i_n, i_h = tl.cast(i_nh // H, tl.int64), i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(chunk_first_ptr + i_n).to(tl.int64)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    r_b = 1 + i_b * FB + tl.arange(0, FB)
    m_r = r_b < F
    block = r_b[:, None] * V + o_v[None, :]
    m_block = m_r[:, None] & m_v[None, :]
    m_row0 = m_v & (i_b == 0)
    seq_base = i_n * H + i_h

    state = tl.zeros([FB, BV], dtype=tl.float32)
    state0 = tl.zeros([BV], dtype=tl.float32)  # row 0: the sum of v (block 0 only)
    z = tl.zeros([FB], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(s0_ptr + seq_base * F * V + block, mask=m_block, other=0.0)
        state0 += tl.load(s0_ptr + seq_base * F * V + o_v, mask=m_row0, other=0.0)
        z += tl.load(z0_ptr + seq_base * F + r_b, mask=m_r, other=0.0)
        count = tl.load(z0_ptr + seq_base * F)
    else:
        count = 0.0
    for c in range(0, tl.cdiv(eos - bos, BT)):
        chunk_base = (first + c) * H + i_h
        tl.store(h_ptr + chunk_base * F * V + block, state, mask=m_block)
        tl.store(h_ptr + chunk_base * F * V + o_v, state0, mask=m_row0)
        if i_v == 0:
            tl.store(hz_ptr + chunk_base * F + r_b, z, mask=m_r)
            if i_b == 0:
                # z's row 0 counts the tokens so far: every earlier chunk is full.
                tl.store(hz_ptr + chunk_base * F, count + tl.cast(c * BT, tl.float32))
        rows = bos + c * BT + tl.arange(0, BT)
        m_t = rows < eos
        k_t = tl.load(
            k_ptr + (rows[None, :] * H + i_h) * D + o_d[:, None], mask=m_t[None, :], other=0.0
        ).to(tl.float32)
        w_t = _taylor_weights(k_ptr, rows, m_t, H, i_h, i_b, D, FB, True)
        phi_t = _taylor_block(k_t, w_t, FB, True)  # [FB, BT]
        v = tl.load(
            v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & m_v[None, :],
            other=0.0,
        )
        state += tl.dot(phi_t.to(v.dtype), v, input_precision=DOT)
        z += tl.sum(phi_t, axis=1)
        if i_b == 0:
            state0 += tl.sum(v.to(tl.float32), axis=0)
    if STORE_FINAL:
        tl.store(st_ptr + seq_base * F * V + block, state, mask=m_block)
        tl.store(st_ptr + seq_base * F * V + o_v, state0, mask=m_row0)
        if i_v == 0:
            tl.store(zt_ptr + seq_base * F + r_b, z, mask=m_r)
            if i_b == 0:
                tl.store(zt_ptr + seq_base * F, count + tl.cast(eos - bos, tl.float32))


# One program: the [BT, BV] output block of one chunk and head: Taylor scores of the chunk
# from the raw q k^T, the entering state through the feature blocks, then the division.
@triton.jit
def _fwd_output_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, hz_ptr, o_ptr, den_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    eps, H, V,
    D: tl.constexpr, F: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    chunk_base = tl.cast(i_c, tl.int64) * H + i_h
    h_base = chunk_base * F * V

    q = tl.load(q_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :], mask=m_t[:, None], other=0.0)
    k_t = tl.load(
        k_ptr + (rows[None, :] * H + i_h) * D + o_d[:, None], mask=m_t[None, :], other=0.0
    )
    v = tl.load(v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    qf = q.to(tl.float32)
    s = tl.dot(q, k_t, input_precision=DOT) * D**-0.5
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    attn = tl.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
    num = tl.dot(attn.to(v.dtype), v, input_precision=DOT)
    den = tl.sum(attn, axis=1)

    num += tl.load(h_ptr + h_base + o_v, mask=m_v & valid, other=0.0)[None, :]
    den += tl.load(hz_ptr + chunk_base * F, mask=valid, other=0.0)
    for i_b in range(0, tl.cdiv(F - 1, FB)):
        r_b = 1 + i_b * FB + tl.arange(0, FB)
        m_r = (r_b < F) & valid
        phi = _taylor_block(
            qf, _taylor_weights(q_ptr, rows, m_t, H, i_h, i_b, D, FB, False), FB, False
        )
        state = tl.load(
            h_ptr + h_base + r_b[:, None] * V + o_v[None, :],
            mask=m_r[:, None] & m_v[None, :],
            other=0.0,
        )
        z = tl.load(hz_ptr + chunk_base * F + r_b, mask=m_r, other=0.0)
        num += tl.dot(phi.to(q.dtype), state.to(q.dtype), input_precision=DOT)
        den += tl.sum(phi * z[None, :], axis=1)
    out = num / (den + eps)[:, None]
    tl.store(
        o_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_tv,
    )
    if i_v == 0:
        tl.store(den_ptr + rows * H + i_h, den, mask=m_t)


@triton.jit
def _row_terms(den_ptr, delta_ptr, rows, m_t, H, i_h, eps):
    """(r, dden) [BT]: r = 1 / (den + eps) and the denominator's gradient -delta r."""
    den = tl.load(den_ptr + rows * H + i_h, mask=m_t, other=1.0)
    delta = tl.load(delta_ptr + rows * H + i_h, mask=m_t, other=0.0)
    r = 1.0 / (den + eps)
    return r, -delta * r


# One program: one feature block (as in the forward) of one (sequence, head) state gradient and
# BV values, carried backwards over the chunks; stores the gradient of the state leaving every
# chunk and, if asked, of the initial state.
@triton.jit
def _bwd_states_kernel(
    q_ptr, do_ptr, den_ptr, delta_ptr, dst_ptr, dzt_ptr, dh_ptr, dhz_ptr, ds0_ptr, dz0_ptr,
    cu_ptr, chunk_first_ptr,
    eps, H, V,
    D: tl.constexpr, F: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_bv, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_b, i_v = i_bv // NV, i_bv % NV
    i_n, i_h = tl.cast(i_nh // H, tl.int64), i_nh % H
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(chunk_first_ptr + i_n).to(tl.int64)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    r_b = 1 + i_b * FB + tl.arange(0, FB)
    m_r = r_b < F
    block = r_b[:, None] * V + o_v[None, :]
    m_block = m_r[:, None] & m_v[None, :]
    m_row0 = m_v & (i_b == 0)
    seq_base = i_n * H + i_h

    dstate = tl.zeros([FB, BV], dtype=tl.float32)
    dstate0 = tl.zeros([BV], dtype=tl.float32)
    dz = tl.zeros([FB], dtype=tl.float32)
    dcount = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    if HAS_DHT:
        dstate += tl.load(dst_ptr + seq_base * F * V + block, mask=m_block, other=0.0)
        dstate0 += tl.load(dst_ptr + seq_base * F * V + o_v, mask=m_row0, other=0.0)
        dz += tl.load(dzt_ptr + seq_base * F + r_b, mask=m_r, other=0.0)
        dcount += tl.load(dzt_ptr + seq_base * F)
    num_chunks = tl.cdiv(eos - bos, BT)
    for j in range(0, num_chunks):
        c = num_chunks - 1 - j
        chunk_base = (first + c) * H + i_h
        tl.store(dh_ptr + chunk_base * F * V + block, dstate, mask=m_block)
        tl.store(dh_ptr + chunk_base * F * V + o_v, dstate0, mask=m_row0)
        if i_v == 0:
            tl.store(dhz_ptr + chunk_base * F + r_b, dz, mask=m_r)
        rows = bos + c * BT + tl.arange(0, BT)
        m_t = rows < eos
        r, dden = _row_terms(den_ptr, delta_ptr, rows, m_t, H, i_h, eps)
        q_t = tl.load(
            q_ptr + (rows[None, :] * H + i_h) * D + o_d[:, None], mask=m_t[None, :], other=0.0
        ).to(tl.float32)
        w_t = _taylor_weights(q_ptr, rows, m_t, H, i_h, i_b, D, FB, True)
        phi_t = _taylor_block(q_t, w_t, FB, True)  # [FB, BT]
        do = tl.load(
            do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & m_v[None, :],
            other=0.0,
        )
        dstate += tl.dot((phi_t * r[None, :]).to(do.dtype), do, input_precision=DOT)
        dz += tl.sum(phi_t * dden[None, :], axis=1)
        if i_b == 0:
            dstate0 += tl.sum(do.to(tl.float32) * r[:, None], axis=0)
            dcount += tl.sum(dden, axis=0)
    if STORE_DH0:
        tl.store(ds0_ptr + seq_base * F * V + block, dstate, mask=m_block)
        tl.store(ds0_ptr + seq_base * F * V + o_v, dstate0, mask=m_row0)
        if i_v == 0:
            tl.store(dz0_ptr + seq_base * F + r_b, dz, mask=m_r)
            if i_b == 0:
                tl.store(dz0_ptr + seq_base * F, dcount)


# One program: dq and dk `[BT, 16]` of one chunk and head: the intra-chunk part through the
# Taylor scores, then per feature block the feature gradients (looping over V blocks), folded
# back to the 16 raw dims in registers.
@triton.jit
def _bwd_dqk_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, hz_ptr, do_ptr, den_ptr, delta_ptr, dh_ptr, dhz_ptr,
    dq_ptr, dk_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    eps, H, V,
    D: tl.constexpr, F: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_d = tl.arange(0, D)
    chunk_base = tl.cast(i_c, tl.int64) * H + i_h
    h_base = chunk_base * F * V
    r, dden = _row_terms(den_ptr, delta_ptr, rows, m_t, H, i_h, eps)

    # Intra-chunk: A = 1 + s + s^2 / 2 with s = q.k / sqrt(d), so dA/ds = 1 + s.
    dattn = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        do = tl.load(do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        v = tl.load(v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
        dattn += tl.dot(do, tl.trans(v), input_precision=DOT)
    offsets = (rows[:, None] * H + i_h) * D + o_d[None, :]
    q = tl.load(q_ptr + offsets, mask=m_t[:, None], other=0.0)
    k = tl.load(k_ptr + offsets, mask=m_t[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * D**-0.5
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    dattn = tl.where(causal, dattn * r[:, None] + dden[:, None], 0.0)
    ds = (dattn * (1.0 + s) * D**-0.5).to(q.dtype)
    dq = tl.dot(ds, k, input_precision=DOT)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT)
    qf, kf = q.to(tl.float32), k.to(tl.float32)

    # Inter-chunk: dphi(q) = r dO S_c^T + dden z_c, dphi(k) = V dS_c+1^T + dz_c+1.
    for i_b in range(0, tl.cdiv(F - 1, FB)):
        r_b = 1 + i_b * FB + tl.arange(0, FB)
        m_r = (r_b < F) & valid
        # One V loop per side keeps a single [BT, FB] accumulator live.
        g = tl.zeros([BT, FB], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            do = tl.load(
                do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
                mask=m_t[:, None] & (o_v < V)[None, :],
                other=0.0,
            )
            state_t = tl.load(
                h_ptr + h_base + r_b[None, :] * V + o_v[:, None],
                mask=(o_v < V)[:, None] & m_r[None, :],
                other=0.0,
            )  # [BV, FB]
            g += tl.dot(do, state_t.to(do.dtype), input_precision=DOT)
        z = tl.load(hz_ptr + chunk_base * F + r_b, mask=m_r, other=0.0)
        g = g * r[:, None] + dden[:, None] * z[None, :]
        w = _taylor_weights(q_ptr, rows, m_t, H, i_h, i_b, D, FB, False)
        dq += _taylor_block_grad(g, qf, w, i_b, D, FB, DOT)

        g = tl.zeros([BT, FB], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            v = tl.load(
                v_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
                mask=m_t[:, None] & (o_v < V)[None, :],
                other=0.0,
            )
            dstate_t = tl.load(
                dh_ptr + h_base + r_b[None, :] * V + o_v[:, None],
                mask=(o_v < V)[:, None] & m_r[None, :],
                other=0.0,
            )
            g += tl.dot(v, dstate_t.to(v.dtype), input_precision=DOT)
        g += tl.load(dhz_ptr + chunk_base * F + r_b, mask=m_r, other=0.0)[None, :]
        w = _taylor_weights(k_ptr, rows, m_t, H, i_h, i_b, D, FB, False)
        dk += _taylor_block_grad(g, kf, w, i_b, D, FB, DOT)
    tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=m_t[:, None])
    tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=m_t[:, None])


# One program: dv for a [BT, BV] block of one chunk and head: A^T dnum inside the chunk, plus
# phi(K) dS_c+1 through the feature blocks as in the forward output.
@triton.jit
def _bwd_dv_kernel(
    q_ptr, k_ptr, do_ptr, den_ptr, dh_ptr, dv_ptr, cu_ptr, chunk_seq_ptr, chunk_idx_ptr,
    eps, H, V,
    D: tl.constexpr, F: tl.constexpr, FB: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, m_t, valid, _, _ = chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT)
    o_d = tl.arange(0, D)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    h_base = (tl.cast(i_c, tl.int64) * H + i_h) * F * V

    k = tl.load(k_ptr + (rows[:, None] * H + i_h) * D + o_d[None, :], mask=m_t[:, None], other=0.0)
    q_t = tl.load(
        q_ptr + (rows[None, :] * H + i_h) * D + o_d[:, None], mask=m_t[None, :], other=0.0
    )
    kf = k.to(tl.float32)
    r = 1.0 / (tl.load(den_ptr + rows * H + i_h, mask=m_t, other=1.0) + eps)
    s_t = tl.dot(k, q_t, input_precision=DOT) * D**-0.5  # [s, t] = k_s . q_t / sqrt(d)
    anti_causal = tl.arange(0, BT)[:, None] <= tl.arange(0, BT)[None, :]
    attn_t = tl.where(anti_causal, (1.0 + s_t + 0.5 * s_t * s_t) * r[None, :], 0.0)
    do = tl.load(do_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0)
    dv = tl.dot(attn_t.to(do.dtype), do, input_precision=DOT)

    dv += tl.load(dh_ptr + h_base + o_v, mask=m_v & valid, other=0.0)[None, :]
    for i_b in range(0, tl.cdiv(F - 1, FB)):
        r_b = 1 + i_b * FB + tl.arange(0, FB)
        m_r = (r_b < F) & valid
        phi = _taylor_block(
            kf, _taylor_weights(k_ptr, rows, m_t, H, i_h, i_b, D, FB, False), FB, False
        )
        dstate = tl.load(
            dh_ptr + h_base + r_b[:, None] * V + o_v[None, :],
            mask=m_r[:, None] & m_v[None, :],
            other=0.0,
        )
        dv += tl.dot(phi.to(k.dtype), dstate.to(k.dtype), input_precision=DOT)
    tl.store(
        dv_ptr + (rows[:, None] * H + i_h) * V + o_v[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=m_tv,
    )


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    """How one kernel is launched: feature rows per block (FB), the cap on the V block, warps.

    Chosen so that every kernel compiles for sm_80 and sm_90 without spills (aot.py compiles
    exactly these); dq/dk holds the most live tiles, so it takes the smallest blocks.
    """

    FB: int
    BV_cap: int
    num_warps: int

    def blocks(self, V: int) -> dict[str, int]:
        return {
            "D": FEATURE_DIM, "F": NUM_FEATURES, "FB": self.FB, "BT": CHUNK,
            "BV": _block(V, self.BV_cap),
        }  # fmt: skip

    def num_feature_blocks(self) -> int:
        return triton.cdiv(NUM_FEATURES - 1, self.FB)


_LAUNCH = {
    "fwd_states": _Launch(FB=64, BV_cap=64, num_warps=8),
    "fwd_output": _Launch(FB=64, BV_cap=64, num_warps=4),
    "bwd_states": _Launch(FB=64, BV_cap=64, num_warps=8),
    "bwd_dqk": _Launch(FB=32, BV_cap=32, num_warps=8),
    "bwd_dv": _Launch(FB=64, BV_cap=64, num_warps=4),
}


def _states(k, v, s0, z0, chunks, output_final):
    """States entering every chunk (S `[bound, H, F, V]`, z `[bound, H, F]`, fp32), and the
    final ones (or None, None)."""
    _, H, _ = k.shape
    V = v.shape[-1]
    launch = _LAUNCH["fwd_states"]
    blocks = launch.blocks(V)
    h = torch.empty(chunks.bound, H, NUM_FEATURES, V, dtype=torch.float32, device=k.device)
    hz = torch.empty(chunks.bound, H, NUM_FEATURES, dtype=torch.float32, device=k.device)
    st, zt = h, hz  # never written unless output_final
    if output_final:
        st = torch.empty(chunks.num_seqs, H, NUM_FEATURES, V, dtype=torch.float32, device=k.device)
        zt = torch.empty(chunks.num_seqs, H, NUM_FEATURES, dtype=torch.float32, device=k.device)
    grid = (launch.num_feature_blocks() * triton.cdiv(V, blocks["BV"]), chunks.num_seqs * H)
    _fwd_states_kernel[grid](
        k, v, k if s0 is None else s0, k if z0 is None else z0, h, hz, st, zt,
        chunks.cu, chunks.first, H, V, **blocks,
        HAS_H0=s0 is not None, STORE_FINAL=output_final, num_warps=launch.num_warps,
        DOT=dot_precision(k.dtype),
    )  # fmt: skip
    return h, hz, (st if output_final else None), (zt if output_final else None)


class BasedAttnFunction(torch.autograd.Function):
    """Packed fused BASED: q, k `[R, H, 16]`, v `[R, H, V]`, initial state S `[N, H, 273, V]`
    and z `[N, H, 273]` fp32 (or None). Returns o `[R, H, V]` in v's dtype and the final
    (S, z) or (None, None)."""

    @staticmethod
    def forward(ctx, q, k, v, s0, z0, cu, fixed_length, eps, output_final):
        R, H, _ = q.shape
        V = v.shape[-1]
        chunks = ChunkTable(cu, R, fixed_length, CHUNK)
        h, hz, st, zt = _states(k, v, s0, z0, chunks, output_final)
        o = torch.empty(R, H, V, dtype=v.dtype, device=v.device)
        den = torch.empty(R, H, dtype=torch.float32, device=v.device)
        launch = _LAUNCH["fwd_output"]
        blocks = launch.blocks(V)
        _fwd_output_kernel[(triton.cdiv(V, blocks["BV"]), chunks.bound, H)](
            q, k, v, h, hz, o, den, chunks.cu, chunks.seq, chunks.idx,
            eps, H, V, **blocks, num_warps=launch.num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, s0, z0, cu, o, den)
        ctx.fixed_length, ctx.eps = fixed_length, eps
        return o, st, zt

    @staticmethod
    def backward(ctx, do, dst, dzt):
        q, k, v, s0, z0, cu, o, den = ctx.saved_tensors
        eps = ctx.eps
        R, H, _ = q.shape
        V = v.shape[-1]
        chunks = ChunkTable(cu, R, ctx.fixed_length, CHUNK)
        do = do.to(v.dtype).contiguous()
        # rowsum(dO . O) gives the denominator's gradient: -rowsum(dO . O) / (den + eps).
        delta = (do.float() * o.float()).sum(-1)
        has_dht = dst is not None or dzt is not None
        if has_dht:
            if dst is None:
                dst = v.new_zeros(chunks.num_seqs, H, NUM_FEATURES, V, dtype=torch.float32)
            dst = dst.float().contiguous()
            dzt = dst.new_zeros(dst.shape[:3]) if dzt is None else dzt.float().contiguous()
        h, hz, _, _ = _states(k, v, s0, z0, chunks, False)
        dh, dhz = torch.empty_like(h), torch.empty_like(hz)
        want_dh0 = s0 is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        ds0 = torch.empty(chunks.num_seqs, H, NUM_FEATURES, V, dtype=torch.float32, device=v.device)
        dz0 = torch.empty(chunks.num_seqs, H, NUM_FEATURES, dtype=torch.float32, device=v.device)
        launch = _LAUNCH["bwd_states"]
        blocks = launch.blocks(V)
        grid = (launch.num_feature_blocks() * triton.cdiv(V, blocks["BV"]), chunks.num_seqs * H)
        _bwd_states_kernel[grid](
            q, do, den, delta, dh if dst is None else dst, dhz if dzt is None else dzt,
            dh, dhz, ds0, dz0, cu, chunks.first, eps, H, V, **blocks,
            HAS_DHT=has_dht, STORE_DH0=want_dh0, num_warps=launch.num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        launch = _LAUNCH["bwd_dqk"]
        _bwd_dqk_kernel[(chunks.bound, H)](
            q, k, v, h, hz, do, den, delta, dh, dhz, dq, dk, cu, chunks.seq, chunks.idx,
            eps, H, V, **launch.blocks(V), num_warps=launch.num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        launch = _LAUNCH["bwd_dv"]
        blocks = launch.blocks(V)
        _bwd_dv_kernel[(triton.cdiv(V, blocks["BV"]), chunks.bound, H)](
            q, k, do, den, dh, dv, cu, chunks.seq, chunks.idx, eps, H, V, **blocks,
            num_warps=launch.num_warps,
            DOT=dot_precision(q.dtype),
        )  # fmt: skip
        if not want_dh0:
            ds0 = dz0 = None
        return dq, dk, dv, ds0, dz0, None, None, None, None


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def based_attn_triton(q, k, v, *, eps, initial_state, output_final_state, cu_seqlens):
    """Fused Triton BASED; contract of `based_attn` (inputs already checked and contiguous)."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    cu, fixed_length = packed_offsets(B, T, cu_seqlens, q.device)
    q, k, v = (t.reshape(B * T, H, t.shape[-1]) for t in (q, k, v))
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (s.float().contiguous() for s in initial_state)
    o, st, zt = BasedAttnFunction.apply(
        q, k, v, s0, z0, cu, fixed_length, float(eps), output_final_state
    )
    return o.reshape(B, T, H, V), ((st, zt) if output_final_state else None)


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16 inputs, fp32 states)
# --------------------------------------------------------------------------------------


def _aot(name, kernel, launch, V, flags=None):
    constexprs = {**launch.blocks(V), **(flags or {})}
    signature = aot_signature(kernel, constexprs, {**AOT_TYPES, "eps": "fp32"})
    register_aot(
        AotSpec(
            name=name, kernel=kernel, signature=signature, constexprs=constexprs,
            multiple_of_16=("V",), num_warps=launch.num_warps,
        )
    )  # fmt: skip


def _register_aot_specs() -> None:
    kernels = {
        "fwd_states": (_fwd_states_kernel, {"HAS_H0": True, "STORE_FINAL": True}),
        "fwd_output": (_fwd_output_kernel, None),
        "bwd_states": (_bwd_states_kernel, {"HAS_DHT": True, "STORE_DH0": True}),
        "bwd_dqk": (_bwd_dqk_kernel, None),
        "bwd_dv": (_bwd_dv_kernel, None),
    }
    for V in (64, 128):
        for name, (kernel, flags) in kernels.items():
            _aot(f"based_{name}-V{V}", kernel, _LAUNCH[name], V, flags)


_register_aot_specs()
