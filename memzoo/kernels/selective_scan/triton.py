"""Triton selective scan (Mamba-1): forward and backward over chunks of time.

Per channel d and state n, with a_t = exp(delta_t A[d, n]) and b_t = delta_t u_t B_t[n]:
    h_t = a_t h_{t-1} + b_t,    y_t = sum_n C_t[n] h_t[d, n]
One program owns BD channels of one group and one sequence (packed rows, offsets `cu`) and
walks its chunks of BT tokens in order. Inside a chunk the pairs (a, b) are combined by an
associative scan, (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): products of decays <= 1, so
nothing overflows and nothing divides by a decay. The state entering each chunk is stored
(fp32) for the backward, which walks the chunks in reverse:
    dh_t = dy_t C_t + a_{t+1} dh_{t+1}     (a reverse associative scan; dh_T seeded by dS_T)
    du_t = delta_t sum_n dh_t B_t,   ddelta_t = sum_n dh_t (a_t h_{t-1} A + B_t u_t)
    dA = sum_t dh_t a_t h_{t-1} delta_t,  dB_t = sum_d dh_t delta_t u_t,  dC_t = sum_d dy_t h_t
where a_t h_{t-1} = h_t - b_t, so h_{t-1} itself is never needed. The softplus / bias on
delta, the D skip and the z gate are elementwise and run in torch around the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, register_aot


def _launch(N: int, channels_per_group: int, *, backward: bool = False) -> dict:
    """Block sizes: BT tokens x BD channels x BN states per scanned tile.

    Both passes scan chunks of BT = 8 tokens (the backward reads the forward's chunk-boundary
    states); the forward takes 8 x 16 x 16 tiles, the backward 8 x 32 x 16 (the largest that
    compiles without spills for sm_80/sm_90). On an H200 (bf16, B=2, T=8192, Dm=1536, N=16;
    benchmarks/selective_scan_launch_gpu.py) the wider backward took forward+backward from
    13.1 ms to about 11 ms; the forward stays at 2.3 ms.
    """
    BN = max(2, triton.next_power_of_2(N))
    elements = 4096 if backward else 2048
    BD = max(2, min(triton.next_power_of_2(channels_per_group), elements // (8 * BN)))
    return {"BT": 8, "BD": BD, "BN": BN}


# The backward holds about three times the forward's tiles: 8 warps keep it from spilling.
FWD_WARPS, BWD_WARPS = 4, 8


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _channels(Dm, G, BD: tl.constexpr):
    """(group, channel indices [BD], mask) of this program's channel block."""
    i_gd = tl.program_id(0)
    Dg = Dm // G
    blocks = tl.cdiv(Dg, BD)
    i_g, i_b = i_gd // blocks, i_gd % blocks
    local = i_b * BD + tl.arange(0, BD)
    return i_g, i_b, i_g * Dg + local, local < Dg


@triton.jit
def _chunk_inputs(
    u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G, NS,
):  # fmt: skip
    """delta, u [BT, BD]; B, C [BT, BN]; a, b [BT, BD, BN] of one chunk (fp32)."""
    m_td = m_t[:, None] & m_d[None, :]
    delta = tl.load(delta_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0)
    delta = delta.to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    m_ts = m_t[:, None] & m_s[None, :]
    state_rows = (rows[:, None] * G + i_g) * NS + o_s[None, :]
    Bt = tl.load(B_ptr + state_rows, mask=m_ts, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + state_rows, mask=m_ts, other=0.0).to(tl.float32)
    # Masked rows and channels get delta = 0: a = 1, b = 0, so they carry the state unchanged.
    a = tl.exp(delta[:, :, None] * A[None, :, :])
    b = (delta * u)[:, :, None] * Bt[:, None, :]
    return delta, u, Bt, Ct, a, b


# One program: BD channels of one group and one sequence, chunk by chunk in time order.
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hc_ptr, ht_ptr, cu_ptr, first_ptr,
    Dm, G, NS,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d = _channels(Dm, G, BD)
    i_n = tl.cast(tl.program_id(1), tl.int64)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(first_ptr + i_n).to(tl.int64)
    o_s = tl.arange(0, BN)
    m_s = o_s < NS
    m_ds = m_d[:, None] & m_s[None, :]
    block = o_d[:, None] * NS + o_s[None, :]
    A = tl.load(A_ptr + block, mask=m_ds, other=0.0).to(tl.float32)
    last = (tl.arange(0, BT) == BT - 1)[:, None, None]

    h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + i_n * Dm * NS + block, mask=m_ds, other=0.0)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        tl.store(hc_ptr + (first + c) * Dm * NS + block, h, mask=m_ds)
        rows = bos + c * BT + tl.arange(0, BT)
        m_t = rows < eos
        delta, u, Bt, Ct, a, b = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G, NS
        )
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        states = a_cum * h[None, :, :] + b_cum
        y = tl.sum(states * Ct[:, None, :], axis=2)
        tl.store(y_ptr + rows[:, None] * Dm + o_d[None, :], y, mask=m_t[:, None] & m_d[None, :])
        h = tl.sum(tl.where(last, states, 0.0), axis=0)  # padded rows keep the last state
    if STORE_FINAL:
        tl.store(ht_ptr + i_n * Dm * NS + block, h, mask=m_ds)


# One program: the same block, chunk by chunk in reverse, carrying the state gradient.
@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, hc_ptr, dy_ptr, dht_ptr,
    du_ptr, ddelta_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dh0_ptr, cu_ptr, first_ptr,
    R, Dm, G, NS,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d = _channels(Dm, G, BD)
    i_n = tl.cast(tl.program_id(1), tl.int64)
    bos = tl.load(cu_ptr + i_n).to(tl.int64)
    eos = tl.load(cu_ptr + i_n + 1).to(tl.int64)
    first = tl.load(first_ptr + i_n).to(tl.int64)
    o_s = tl.arange(0, BN)
    m_s = o_s < NS
    m_ds = m_d[:, None] & m_s[None, :]
    block = o_d[:, None] * NS + o_s[None, :]
    A = tl.load(A_ptr + block, mask=m_ds, other=0.0).to(tl.float32)
    o_t = tl.arange(0, BT)

    # `carry` is the gradient flowing into the chunk's last token from after it.
    carry = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_DHT:
        carry += tl.load(dht_ptr + i_n * Dm * NS + block, mask=m_ds, other=0.0)
    dA = tl.zeros([BD, BN], dtype=tl.float32)
    num_chunks = tl.cdiv(eos - bos, BT)
    for j in range(0, num_chunks):
        c = num_chunks - 1 - j
        rows = bos + c * BT + o_t
        m_t = rows < eos
        m_td = m_t[:, None] & m_d[None, :]
        delta, u, Bt, Ct, a, b = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G, NS
        )
        h_start = tl.load(hc_ptr + (first + c) * Dm * NS + block, mask=m_ds, other=0.0)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        states = a_cum * h_start[None, :, :] + b_cum

        # a_{t+1} inside the chunk; 0 at its last token, whose successor arrives as `carry`.
        has_next = (o_t < BT - 1) & (rows + 1 < eos)
        delta_next = tl.load(
            delta_ptr + (rows + 1)[:, None] * Dm + o_d[None, :],
            mask=has_next[:, None] & m_d[None, :],
            other=0.0,
        ).to(tl.float32)
        a_next = tl.where(has_next[:, None, None], tl.exp(delta_next[:, :, None] * A[None]), 0.0)
        dy = tl.load(dy_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0)
        is_last = (o_t == tl.minimum(eos - bos - c * BT, BT) - 1)[:, None, None]
        inflow = dy[:, :, None] * Ct[:, None, :] + tl.where(is_last, carry[None, :, :], 0.0)
        _, dh = tl.associative_scan((a_next, inflow), 0, _combine, reverse=True)

        decayed_prev = states - b  # a_t h_{t-1}
        du = delta * tl.sum(dh * Bt[:, None, :], axis=2)
        ddelta = tl.sum(dh * (decayed_prev * A[None] + Bt[:, None, :] * u[:, :, None]), axis=2)
        dA += tl.sum(dh * decayed_prev * delta[:, :, None], axis=0)
        offsets = rows[:, None] * Dm + o_d[None, :]
        tl.store(du_ptr + offsets, du, mask=m_td)
        tl.store(ddelta_ptr + offsets, ddelta, mask=m_td)
        # Per channel block partials of dB, dC `[blocks, R, G, NS]`, summed by the launcher.
        part = ((i_b * R + rows[:, None]) * G + i_g) * NS + o_s[None, :]
        m_ts = m_t[:, None] & m_s[None, :]
        tl.store(dB_part_ptr + part, tl.sum(dh * (delta * u)[:, :, None], axis=1), mask=m_ts)
        tl.store(dC_part_ptr + part, tl.sum(dy[:, :, None] * states, axis=1), mask=m_ts)
        carry = tl.sum(tl.where((o_t == 0)[:, None, None], a * dh, 0.0), axis=0)
    tl.store(dA_part_ptr + i_n * Dm * NS + block, dA, mask=m_ds)
    if STORE_DH0:
        tl.store(dh0_ptr + i_n * Dm * NS + block, carry, mask=m_ds)


class SelectiveScanFunction(torch.autograd.Function):
    """Packed scan: u, delta `[R, Dm]` (delta already softplus'd), A `[Dm, N]` fp32,
    B, C `[R, G, N]`, h0 `[N_seq, Dm, N]` fp32 or None. Returns y `[R, Dm]` fp32 (before the
    D skip and z gate) and the final state or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, cu, fixed_length, output_final):
        R, Dm = u.shape
        G, N = B.shape[1], B.shape[2]
        launch = _launch(N, Dm // G)
        chunks = ChunkTable(cu, R, fixed_length, launch["BT"])
        y = torch.empty(R, Dm, dtype=torch.float32, device=u.device)
        hc = torch.empty(chunks.bound, Dm, N, dtype=torch.float32, device=u.device)
        ht = torch.empty(chunks.num_seqs, Dm, N, dtype=torch.float32, device=u.device)
        grid = (G * triton.cdiv(Dm // G, launch["BD"]), chunks.num_seqs)
        _fwd_kernel[grid](
            u, delta, A, B, C, u if h0 is None else h0, y, hc, ht, cu, chunks.first,
            Dm, G, N, HAS_H0=h0 is not None, STORE_FINAL=output_final, **launch,
            num_warps=FWD_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, h0, cu, hc, chunks.first)
        ctx.num_seqs = chunks.num_seqs
        return y, (ht if output_final else None)

    @staticmethod
    def backward(ctx, dy, dht):
        u, delta, A, B, C, h0, cu, hc, first = ctx.saved_tensors
        R, Dm = u.shape
        G, N = B.shape[1], B.shape[2]
        launch = _launch(N, Dm // G, backward=True)
        blocks = triton.cdiv(Dm // G, launch["BD"])
        f32 = {"dtype": torch.float32, "device": u.device}
        du, ddelta = torch.empty(R, Dm, **f32), torch.empty(R, Dm, **f32)
        dA_part = torch.empty(ctx.num_seqs, Dm, N, **f32)
        dB_part, dC_part = torch.empty(blocks, R, G, N, **f32), torch.empty(blocks, R, G, N, **f32)
        dh0 = torch.empty(ctx.num_seqs, Dm, N, **f32)
        _bwd_kernel[(G * blocks, ctx.num_seqs)](
            u, delta, A, B, C, hc, dy.float().contiguous(),
            hc if dht is None else dht.float().contiguous(),
            du, ddelta, dA_part, dB_part, dC_part, dh0, cu, first,
            R, Dm, G, N, HAS_DHT=dht is not None, STORE_DH0=h0 is not None, **launch,
            num_warps=BWD_WARPS,
        )  # fmt: skip
        return (
            du.to(u.dtype), ddelta.to(delta.dtype), dA_part.sum(0).to(A.dtype),
            dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype),
            None if h0 is None else dh0, None, None, None,
        )  # fmt: skip


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def selective_scan_triton(
    u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state, output_final_state,
    cu_seqlens,
):  # fmt: skip
    """Triton selective scan; contract of `memzoo.kernels.selective_scan.selective_scan`
    (inputs checked and contiguous)."""
    batch, T, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    cu, fixed_length = packed_offsets(batch, T, cu_seqlens, u.device)
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)
    if delta_softplus:
        delta = F.softplus(delta.float())
    h0 = None if initial_state is None else initial_state.float().contiguous()
    y, final = SelectiveScanFunction.apply(
        u.reshape(batch * T, Dm), delta.reshape(batch * T, Dm).contiguous(), A.float(),
        B.reshape(batch * T, G, N), C.reshape(batch * T, G, N), h0, cu, fixed_length,
        output_final_state,
    )  # fmt: skip
    y = y.reshape(batch, T, Dm)
    if D is not None:
        y = y + D.float() * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), final


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16 activations, fp32 states)
# --------------------------------------------------------------------------------------


def _register_aot_specs() -> None:
    types = {
        **{f"{n}_ptr": "*bf16" for n in ("u", "B", "C")},
        **{f"{n}_ptr": "*i32" for n in ("cu", "first")},
    }
    for N in (4, 16):
        for name, kernel, flags, num_warps in (
            ("fwd", _fwd_kernel, {"HAS_H0": True, "STORE_FINAL": True}, FWD_WARPS),
            ("bwd", _bwd_kernel, {"HAS_DHT": True, "STORE_DH0": True}, BWD_WARPS),
        ):
            launch = _launch(N, channels_per_group=1536, backward=name == "bwd")
            constexprs = {**launch, **flags}
            register_aot(
                AotSpec(
                    name=f"selective_scan_{name}-N{N}-BD{launch['BD']}",
                    kernel=kernel,
                    signature=aot_signature(kernel, constexprs, types),
                    constexprs=constexprs,
                    num_warps=num_warps,
                    multiple_of_16=("Dm",),
                )
            )


_register_aot_specs()
