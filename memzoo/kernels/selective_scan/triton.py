"""Triton selective scan (Mamba-1): forward and backward over tiles of time.

Per channel d and state n, with a_t = exp(delta_t A[d, n]) and b_t = delta_t u_t B_t[n]:
    h_t = a_t h_{t-1} + b_t,    y_t = sum_n C_t[n] h_t[d, n]
One program owns BD channels of one group and one sequence (packed rows, offsets `cu`) and
walks its tiles of BT tokens in order. Inside a tile the pairs (a, b) are combined by an
associative scan, (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): products of decays <= 1, so
nothing overflows and nothing divides by a decay. When that launch is too narrow to fill the
GPU (few sequences, few channels), each sequence is cut into segments walked side by side: a
first pass scans every segment from a zero state, a sequential pass over segment boundaries
carries the state across each with its total decay exp(A sum_t delta_t) <= 1, and the main
pass rescans every segment from its true entering state (`_segment_length`). Under autograd
the state entering each tile is stored (fp32) for the backward, which walks the tiles in
reverse (segmented the same way):
    dh_t = dy_t C_t + a_{t+1} dh_{t+1}     (a reverse associative scan; dh_T seeded by dS_T)
    du_t = delta_t sum_n dh_t B_t,   ddelta_t = sum_n dh_t (a_t h_{t-1} A + B_t u_t)
    dA = sum_t dh_t a_t h_{t-1} delta_t,  dB_t = sum_d dh_t delta_t u_t,  dC_t = sum_d dy_t h_t
where a_t h_{t-1} = h_t - b_t, so h_{t-1} itself is never needed. Each main pass comes in two
forms (`FORWARD`, `BACKWARD`): the tiles above, or the states looped one by one over tiles of
(token, channel) in channel-major copies, as mamba-ssm's CUDA kernels do (`_fwd_looped_kernel`,
`_bwd_looped_kernel`; not yet timed on a GPU, so not the default). delta's bias and softplus run
before the kernels, in torch, each way (`_step_sizes`): the forward keeps none of it, and the
backward's kernel turns ddelta into the gradient of the raw step with softplus' derivative,
sigmoid, writing it in the raw step's dtype. The D skip and the z gate run after the scan, in
one kernel each way (`gate_triton.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from memzoo.kernels._chunks import ChunkTable, packed_offsets
from memzoo.kernels._core import AotSpec, aot_signature, register_aot
from memzoo.kernels._occupancy import resident_programs, sm_count
from memzoo.kernels.selective_scan.gate_triton import skip_and_gate_triton


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

# The main passes, each way: "tiles", `_fwd_kernel` and `_bwd_kernel` ([BT, BD, BN] tiles), or
# "looped", `_fwd_looped_kernel` and `_bwd_looped_kernel` ([BT, BD] tiles, the states one by
# one). Either forward stores what either backward reads.
# `benchmarks/selective_scan_launch_gpu.py --forms tiles/tiles looped/looped` times them.
FORWARD = BACKWARD = "tiles"
# The looped kernels' (BT, BD, warps): a warp for each channel, its threads along the tokens.
# Of the shapes swept with the AOT, the widest that compile without spills for sm_80 and sm_90
# on Triton 3.6 and 3.7: 56-64 registers forward, 72-80 backward (whose tiles hold more; at
# [32, 8] and 8 warps ptxas keeps 64 and spills).
LOOPED_FWD, LOOPED_BWD = (32, 16, 16), (32, 4, 4)


def _form(name: str, value: str) -> bool:
    """Whether the form `value` of `name` (FORWARD or BACKWARD) is "looped"."""
    if value not in ("tiles", "looped"):
        raise ValueError(f"{name} must be 'tiles' or 'looped', got {value!r}")
    return value == "looped"


def _forward_launch(N: int, channels_per_group: int):
    """(kernel, block sizes, warps) of the forward's main pass, as `FORWARD` picks."""
    if _form("FORWARD", FORWARD):
        return _fwd_looped_kernel, _looped_launch(N, channels_per_group, LOOPED_FWD), LOOPED_FWD[2]
    return _fwd_kernel, _launch(N, channels_per_group), FWD_WARPS


def _backward_launch(N: int, channels_per_group: int):
    """(kernel, block sizes, warps) of the backward's main pass, as `BACKWARD` picks."""
    if _form("BACKWARD", BACKWARD):
        return _bwd_looped_kernel, _looped_launch(N, channels_per_group, LOOPED_BWD), LOOPED_BWD[2]
    return _bwd_kernel, _launch(N, channels_per_group, backward=True), BWD_WARPS


def _looped_launch(N: int, channels_per_group: int, shape: tuple[int, int, int]) -> dict:
    """Block sizes of a looped kernel of `shape` (BT, BD, warps): BT tokens x BD channels, BN
    >= N states carried, and the tiled forward's tile length STORED_BT, whose entering states
    every forward stores and every backward reads (BT is a multiple of it)."""
    return {
        "BT": shape[0],
        "BD": max(2, min(triton.next_power_of_2(channels_per_group), shape[1])),
        "BN": max(2, triton.next_power_of_2(N)),
        "STORED_BT": _launch(N, channels_per_group)["BT"],
    }


# The backward's first pass over segments holds no states, only the gradients' reverse scan: it
# takes the forward's tiles at 4 warps (80-150 registers; the backward's tiles spill there).
SEGMENT_WARPS = 4
# Rows. A segment boundary moves about 4 N fp32 values per channel through memory: at N=16,
# an eighth of what the two passes over a segment of 256 bf16 rows read of u and delta.
MIN_SEGMENT = 256


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
def _pairs(Dm, G, NS, BD: tl.constexpr, BN: tl.constexpr):
    """This program's block of (channel, state) pairs: (group, block index, channels [BD] and
    their mask, states [BN] and their mask, the [BD, BN] mask and offsets of the pairs)."""
    i_g, i_b, o_d, m_d = _channels(Dm, G, BD)
    o_s = tl.arange(0, BN)
    m_s = o_s < NS
    m_ds = m_d[:, None] & m_s[None, :]
    return i_g, i_b, o_d, m_d, o_s, m_s, m_ds, o_d[:, None] * NS + o_s[None, :]


@triton.jit
def _block(A_ptr, Dm, G, NS, BD: tl.constexpr, BN: tl.constexpr):
    """`_pairs`, and A there in fp32 [BD, BN]."""
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block = _pairs(Dm, G, NS, BD, BN)
    A = tl.load(A_ptr + block, mask=m_ds, other=0.0).to(tl.float32)
    return i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A


@triton.jit
def _chunk_inputs(u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G,
                  NS):  # fmt: skip
    """delta, u [BT, BD]; B, C [BT, BN]; a, b [BT, BD, BN] of one chunk (fp32)."""
    m_td = m_t[:, None] & m_d[None, :]
    delta = tl.load(delta_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    m_ts = m_t[:, None] & m_s[None, :]
    state_rows = (rows[:, None] * G + i_g) * NS + o_s[None, :]
    Bt = tl.load(B_ptr + state_rows, mask=m_ts, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + state_rows, mask=m_ts, other=0.0).to(tl.float32)
    # Masked rows and channels get delta = 0: a = 1, b = 0, so they carry the state unchanged.
    a = tl.exp(delta[:, :, None] * A[None, :, :])
    b = (delta * u)[:, :, None] * Bt[:, None, :]
    return delta, u, Bt, Ct, a, b


@triton.jit
def _span(cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, BT: tl.constexpr,
          SEGMENTED: tl.constexpr):  # fmt: skip
    """(slot, sequence, start row, stop row, index of the first tile) of this program's rows.

    Without SEGMENTED, program_id(1) is a sequence and the rows are all of it; with it,
    program_id(1) is an entry of the segment table (`ChunkTable` of SEG rows) and the rows are
    that segment's, none for a surplus entry. Tiles of BT rows are numbered per sequence from
    `tile_first`; SEG is a multiple of BT, so a segment starts on a tile.
    """
    slot = tl.cast(tl.program_id(1), tl.int64)
    if SEGMENTED:
        seq = tl.load(seg_seq_ptr + slot)
        valid = seq >= 0
        seq = tl.maximum(seq, 0).to(tl.int64)
        idx = tl.load(seg_idx_ptr + slot).to(tl.int64)
        start = tl.load(cu_ptr + seq).to(tl.int64) + idx * SEG
        stop = tl.minimum(start + SEG, tl.load(cu_ptr + seq + 1).to(tl.int64))
        stop = tl.where(valid, stop, start)
        tile0 = tl.load(tile_first_ptr + seq).to(tl.int64) + idx * (SEG // BT)
    else:
        seq = slot
        start = tl.load(cu_ptr + seq).to(tl.int64)
        stop = tl.load(cu_ptr + seq + 1).to(tl.int64)
        tile0 = tl.load(tile_first_ptr + seq).to(tl.int64)
    return slot, seq, start, stop, tile0


@triton.jit
def _tile(c, start, stop, m_d, BT: tl.constexpr):
    """(first row, rows [BT], their mask, the [BT, BD] mask) of tile c of rows start..stop."""
    tile_start = start + c * BT
    rows = tile_start + tl.arange(0, BT)
    m_t = rows < stop
    return tile_start, rows, m_t, m_t[:, None] & m_d[None, :]


@triton.jit
def _state_inputs(A_ptr, B_ptr, C_ptr, o_d, m_d, state_rows, m_t, n, NS):
    """The looped kernels' inputs of state n: A [BD] and B, C [BT, 1] (fp32) of a tile whose
    rows' (group's) B and C start at `state_rows`."""
    A_n = tl.load(A_ptr + o_d * NS + n, mask=m_d, other=0.0).to(tl.float32)
    B_n = tl.load(B_ptr + state_rows + n, mask=m_t, other=0.0).to(tl.float32)[:, None]
    C_n = tl.load(C_ptr + state_rows + n, mask=m_t, other=0.0).to(tl.float32)[:, None]
    return A_n, B_n, C_n


@triton.jit
def _entering(ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD: tl.constexpr,
              BN: tl.constexpr, GIVEN: tl.constexpr, SEGMENTED: tl.constexpr):  # fmt: skip
    """[BD, BN] fp32: what enters this program's rows (a state forward, a state's gradient
    backward): SEGMENTED, the segment pass's value for the segment; else, with GIVEN, the
    sequence's from `ptr`; else zeros."""
    x = tl.zeros([BD, BN], dtype=tl.float32)
    if SEGMENTED:
        x += tl.load(ptr + slot * Dm * NS + block, mask=m_ds & (stop > start), other=0.0)
    elif GIVEN:
        x += tl.load(ptr + seq * Dm * NS + block, mask=m_ds, other=0.0)
    return x


@triton.jit
def _backward_start(dht_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD: tl.constexpr,
                    BN: tl.constexpr, BT: tl.constexpr, HAS_DHT: tl.constexpr,
                    SEGMENTED: tl.constexpr):  # fmt: skip
    """What a backward program starts its reverse walk over [start, stop) with: the gradient
    entering its last row (`_entering`), zeroed [BD, BN] dA and [BD] dbias sums, and its
    number of BT-row tiles."""
    carry = _entering(
        dht_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD, BN, HAS_DHT, SEGMENTED
    )
    dA = tl.zeros([BD, BN], dtype=tl.float32)
    dbias = tl.zeros([BD], dtype=tl.float32)
    return carry, dA, dbias, tl.cdiv(stop - start, BT)


@triton.jit
def _store_sums(dA_part_ptr, dbias_part_ptr, dh0_ptr, dA, dbias, dh0, slot, seq, block, m_ds,
                o_d, m_d, Dm, NS, HAS_BIAS: tl.constexpr, STORE_DH0: tl.constexpr):  # fmt: skip
    """A backward program's last stores: its partial sums of dA and (HAS_BIAS) of the raw
    step's gradient, per slot (a surplus segment writes zeros), and (STORE_DH0) the initial
    state's gradient."""
    tl.store(dA_part_ptr + slot * Dm * NS + block, dA, mask=m_ds)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + slot * Dm + o_d, dbias, mask=m_d)
    if STORE_DH0:
        tl.store(dh0_ptr + seq * Dm * NS + block, dh0, mask=m_ds)


@triton.jit
def _state_grads(delta_ptr, dy_ptr, A, Ct, rows, o_t, o_d, m_d, stop, tile_start, carry, Dm,
                 BT: tl.constexpr):  # fmt: skip
    """(dy [BT, BD], dh [BT, BD, BN]) of one tile whose rows end at `stop` or go on:
    dh_t = dy_t C_t + a_{t+1} dh_{t+1}, with `carry` the gradient flowing into the tile's last
    row from the row after it."""
    # a_{t+1} inside the tile; 0 at its last row, whose successor arrives as `carry`.
    has_next = (o_t < BT - 1) & (rows + 1 < stop)
    delta_next = tl.load(
        delta_ptr + (rows + 1)[:, None] * Dm + o_d[None, :],
        mask=has_next[:, None] & m_d[None, :],
        other=0.0,
    )
    a_next = tl.where(has_next[:, None, None], tl.exp(delta_next[:, :, None] * A[None]), 0.0)
    m_td = (rows < stop)[:, None] & m_d[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_td, other=0.0)
    is_last = (o_t == tl.minimum(stop - tile_start, BT) - 1)[:, None, None]
    inflow = dy[:, :, None] * Ct[:, None, :] + tl.where(is_last, carry[None, :, :], 0.0)
    _, dh = tl.associative_scan((a_next, inflow), 0, _combine, reverse=True)
    return dy, dh


# Segmented launches only. One program: BD channels of one segment, scanned from a zero state:
# the state it leaves, and the sum of its steps, whose decay exp(A sum) carries a state across it.
@triton.jit
def _fwd_segment_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, seg_state_ptr, seg_dsum_ptr, cu_ptr, tile_first_ptr,
    seg_seq_ptr, seg_idx_ptr,
    Dm, G, NS, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A = _block(A_ptr, Dm, G, NS, BD, BN)
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, BT, True
    )
    last = (tl.arange(0, BT) == BT - 1)[:, None, None]
    h = tl.zeros([BD, BN], dtype=tl.float32)
    dsum = tl.zeros([BD], dtype=tl.float32)
    for c in range(0, tl.cdiv(stop - start, BT)):
        rows = start + c * BT + tl.arange(0, BT)
        delta, u, Bt, Ct, a, b = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, rows < stop, o_d, m_d, o_s, m_s, i_g, Dm, G,
            NS,
        )  # fmt: skip
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        h = tl.sum(tl.where(last, a_cum * h[None, :, :] + b_cum, 0.0), axis=0)
        dsum += tl.sum(delta, axis=0)
    tl.store(seg_state_ptr + slot * Dm * NS + block, h, mask=m_ds)
    tl.store(seg_dsum_ptr + slot * Dm + o_d, dsum, mask=m_d)


# Segmented launches only. One program: BLOCK (channel, state) pairs of one sequence, walking its
# segments in order (REVERSE: backwards), x <- exp(A dsum_s) x + local_s. Each segment's local
# value is replaced by the x that enters it; the x after the last one goes to `final`.
@triton.jit
def _segment_pass_kernel(
    A_ptr, seg_state_ptr, seg_dsum_ptr, init_ptr, final_ptr, cu_ptr, seg_first_ptr,
    Dm, NS, SEG,
    BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
):  # fmt: skip
    i_n = tl.cast(tl.program_id(1), tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < Dm * NS
    A = tl.load(A_ptr + offs, mask=m, other=0.0).to(tl.float32)
    length = tl.load(cu_ptr + i_n + 1).to(tl.int64) - tl.load(cu_ptr + i_n).to(tl.int64)
    count = tl.cdiv(length, SEG)
    first = tl.load(seg_first_ptr + i_n).to(tl.int64)
    x = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INIT:
        x += tl.load(init_ptr + i_n * Dm * NS + offs, mask=m, other=0.0)
    for j in range(0, count):
        if REVERSE:
            s = first + count - 1 - j
        else:
            s = first + j
        local = tl.load(seg_state_ptr + s * Dm * NS + offs, mask=m, other=0.0)
        dsum = tl.load(seg_dsum_ptr + s * Dm + offs // NS, mask=m, other=0.0)
        tl.store(seg_state_ptr + s * Dm * NS + offs, x, mask=m)
        x = tl.exp(A * dsum) * x + local
    if STORE_FINAL:
        tl.store(final_ptr + i_n * Dm * NS + offs, x, mask=m)


# One program: BD channels of one group and one sequence (SEGMENTED: one segment, entered with
# the state the segment pass found), tile by tile in time order.
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hc_ptr, ht_ptr, cu_ptr, tile_first_ptr,
    seg_seq_ptr, seg_idx_ptr,
    Dm, G, NS, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_TILES: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A = _block(A_ptr, Dm, G, NS, BD, BN)
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, BT, SEGMENTED
    )
    last = (tl.arange(0, BT) == BT - 1)[:, None, None]

    h = _entering(h0_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD, BN, HAS_H0, SEGMENTED)
    for c in range(0, tl.cdiv(stop - start, BT)):
        if STORE_TILES:  # the state entering each tile, for the backward
            tl.store(hc_ptr + (tile0 + c) * Dm * NS + block, h, mask=m_ds)
        rows = start + c * BT + tl.arange(0, BT)
        m_t = rows < stop
        delta, u, Bt, Ct, a, b = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G, NS
        )
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        states = a_cum * h[None, :, :] + b_cum
        y = tl.sum(states * Ct[:, None, :], axis=2)
        tl.store(y_ptr + rows[:, None] * Dm + o_d[None, :], y, mask=m_t[:, None] & m_d[None, :])
        h = tl.sum(tl.where(last, states, 0.0), axis=0)  # padded rows keep the last state
    if STORE_FINAL:
        tl.store(ht_ptr + seq * Dm * NS + block, h, mask=m_ds)


# The same forward with the states looped, on channel-major copies of u and the step (`[Dm, R]`)
# and writing y channel-major: [BT, BD] tiles of (token, channel), whose BT tokens run along a
# warp's threads, visit the NS states one after another, each with its own scan over the tile's
# tokens (see `_bwd_looped_kernel`). It stores the same states as `_fwd_kernel`: the state
# entering every STORED_BT rows, each taken from inside the tile.
@triton.jit
def _fwd_looped_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, hc_ptr, ht_ptr, cu_ptr, tile_first_ptr,
    seg_seq_ptr, seg_idx_ptr,
    Dm, G, NS, SEG, R,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, STORED_BT: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_TILES: tl.constexpr,
    SEGMENTED: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block = _pairs(Dm, G, NS, BD, BN)
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, STORED_BT, SEGMENTED
    )
    o_t = tl.arange(0, BT)
    channel_rows = o_d.to(tl.int64)[None, :] * R
    last = (o_t == BT - 1)[:, None]

    # `h[:, n]` is the state entering the tile.
    h = _entering(h0_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD, BN, HAS_H0, SEGMENTED)
    for c in range(0, tl.cdiv(stop - start, BT)):
        tile_start, rows, m_t, m_td = _tile(c, start, stop, m_d, BT)
        offsets = channel_rows + rows[:, None]
        # Masked rows and channels: delta = 0, so a = 1 and b = 0; padded rows keep the state.
        delta = tl.load(delta_ptr + offsets, mask=m_td, other=0.0)
        x = delta * tl.load(u_ptr + offsets, mask=m_td, other=0.0).to(tl.float32)
        y = tl.zeros([BT, BD], dtype=tl.float32)
        h_out = tl.zeros([BD, BN], dtype=tl.float32)
        state_rows = (rows * G + i_g) * NS
        stored = hc_ptr + (tile0 + c * (BT // STORED_BT)) * Dm * NS + o_d * NS
        for n in range(0, NS):
            is_n = (o_s == n)[None, :]
            A_n, B_n, C_n = _state_inputs(A_ptr, B_ptr, C_ptr, o_d, m_d, state_rows, m_t, n, NS)
            h_n = tl.sum(tl.where(is_n, h, 0.0), axis=1)
            a_cum, b_cum = tl.associative_scan((tl.exp(delta * A_n[None, :]), x * B_n), 0, _combine)
            states = a_cum * h_n[None, :] + b_cum
            y += states * C_n
            if STORE_TILES:  # the states entering the tile's stored tiles, for the backward
                tl.store(stored + n, h_n, mask=m_d)
                for k in tl.static_range(1, BT // STORED_BT):
                    before = (o_t == k * STORED_BT - 1)[:, None]
                    entering = tl.sum(tl.where(before, states, 0.0), axis=0)
                    inside = tile_start + k * STORED_BT < stop
                    tl.store(stored + k * Dm * NS + n, entering, mask=m_d & inside)
            h_out = tl.where(is_n, tl.sum(tl.where(last, states, 0.0), axis=0)[:, None], h_out)
        h = h_out
        tl.store(y_ptr + offsets, y, mask=m_td)
    if STORE_FINAL:
        tl.store(ht_ptr + seq * Dm * NS + block, h, mask=m_ds)


# Segmented launches only. One program: BD channels of one segment, in reverse from a zero
# gradient after it: the gradient it sends to the state entering it, and the sum of its steps.
@triton.jit
def _bwd_segment_kernel(
    delta_ptr, A_ptr, C_ptr, dy_ptr, seg_carry_ptr, seg_dsum_ptr, cu_ptr, tile_first_ptr,
    seg_seq_ptr, seg_idx_ptr,
    Dm, G, NS, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A = _block(A_ptr, Dm, G, NS, BD, BN)
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, BT, True
    )
    o_t = tl.arange(0, BT)
    carry = tl.zeros([BD, BN], dtype=tl.float32)
    dsum = tl.zeros([BD], dtype=tl.float32)
    num_tiles = tl.cdiv(stop - start, BT)
    for j in range(0, num_tiles):
        tile_start = start + (num_tiles - 1 - j) * BT
        rows = tile_start + o_t
        m_t = rows < stop
        # Only delta and C: this pass needs no decays but its first row's.
        delta = tl.load(
            delta_ptr + rows[:, None] * Dm + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
            other=0.0,
        )  # fmt: skip
        Ct = tl.load(
            C_ptr + ((rows[:, None] * G + i_g) * NS + o_s[None, :]),
            mask=m_t[:, None] & m_s[None, :],
            other=0.0,
        ).to(tl.float32)
        dy, dh = _state_grads(
            delta_ptr, dy_ptr, A, Ct, rows, o_t, o_d, m_d, stop, tile_start, carry, Dm, BT
        )
        # The gradient sent to the state entering the tile: a_0 dh_0, of its first row.
        first = (o_t == 0)[:, None]
        delta_0 = tl.sum(tl.where(first, delta, 0.0), axis=0)
        carry = tl.exp(delta_0[:, None] * A) * tl.sum(tl.where(first[:, :, None], dh, 0.0), axis=0)
        dsum += tl.sum(delta, axis=0)
    tl.store(seg_carry_ptr + slot * Dm * NS + block, carry, mask=m_ds)
    tl.store(seg_dsum_ptr + slot * Dm + o_d, dsum, mask=m_d)


# One program: the same rows as the forward's, tile by tile in reverse, carrying the state
# gradient (SEGMENTED: entered with the gradient the reverse segment pass found).
@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, gate_ptr, A_ptr, B_ptr, C_ptr, hc_ptr, dy_ptr, dht_ptr,
    du_ptr, ddelta_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dbias_part_ptr, dh0_ptr, cu_ptr,
    tile_first_ptr, seg_seq_ptr, seg_idx_ptr,
    R, Dm, G, NS, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, SEGMENTED: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block, A = _block(A_ptr, Dm, G, NS, BD, BN)
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, BT, SEGMENTED
    )
    o_t = tl.arange(0, BT)

    # `carry` is the gradient flowing into the tile's last row from after it.
    carry, dA, dbias, num_tiles = _backward_start(
        dht_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD, BN, BT, HAS_DHT, SEGMENTED
    )
    for j in range(0, num_tiles):
        c = num_tiles - 1 - j
        tile_start, rows, m_t, m_td = _tile(c, start, stop, m_d, BT)
        delta, u, Bt, Ct, a, b = _chunk_inputs(
            u_ptr, delta_ptr, B_ptr, C_ptr, A, rows, m_t, o_d, m_d, o_s, m_s, i_g, Dm, G, NS
        )
        h_start = tl.load(hc_ptr + (tile0 + c) * Dm * NS + block, mask=m_ds, other=0.0)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
        states = a_cum * h_start[None, :, :] + b_cum
        dy, dh = _state_grads(
            delta_ptr, dy_ptr, A, Ct, rows, o_t, o_d, m_d, stop, tile_start, carry, Dm, BT
        )

        decayed_prev = states - b  # a_t h_{t-1}
        du = delta * tl.sum(dh * Bt[:, None, :], axis=2)
        ddelta = tl.sum(dh * (decayed_prev * A[None] + Bt[:, None, :] * u[:, :, None]), axis=2)
        dA += tl.sum(dh * decayed_prev * delta[:, :, None], axis=0)
        offsets = rows[:, None] * Dm + o_d[None, :]
        if HAS_GATE:  # the gradient of the raw step (+ bias): softplus' = sigmoid, given
            ddelta *= tl.load(gate_ptr + offsets, mask=m_td, other=0.0)
        # In the inputs' dtypes; the bias's gradient sums the fp32 values first.
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=m_td)
        tl.store(ddelta_ptr + offsets, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m_td)
        if HAS_BIAS:
            dbias += tl.sum(tl.where(m_td, ddelta, 0.0), axis=0)
        # Per channel block partials of dB, dC `[blocks, R, G, NS]`, summed by the launcher.
        part = ((i_b * R + rows[:, None]) * G + i_g) * NS + o_s[None, :]
        m_ts = m_t[:, None] & m_s[None, :]
        tl.store(dB_part_ptr + part, tl.sum(dh * (delta * u)[:, :, None], axis=1), mask=m_ts)
        tl.store(dC_part_ptr + part, tl.sum(dy[:, :, None] * states, axis=1), mask=m_ts)
        carry = tl.sum(tl.where((o_t == 0)[:, None, None], a * dh, 0.0), axis=0)
    _store_sums(dA_part_ptr, dbias_part_ptr, dh0_ptr, dA, dbias, carry, slot, seq, block, m_ds,
                o_d, m_d, Dm, NS, HAS_BIAS, STORE_DH0)  # fmt: skip


# The same backward with the states looped, on channel-major copies of its [R, Dm] inputs and
# outputs (`[Dm, R]`: time is the contiguous axis). One program takes [BT, BD] tiles of (token,
# channel), whose BT tokens run along a warp's threads, and visits the NS states one after
# another, each with its own scans over the tile's tokens, as mamba-ssm's CUDA kernel does. No
# tensor holds a state axis but the [BD, BN] carries, and du and ddelta sum over the states in
# place. The state entering each tile is the forward's, read every BT / STORED_BT stored tiles.
# Its tiles are narrow, so dB and dC `[G, NS, R]` (fp32, zeroed) take every channel block's sum
# by atomic adds, where `_bwd_kernel` writes a partial per block: their order, and so their last
# bits, may differ from run to run.
@triton.jit
def _bwd_looped_kernel(
    u_ptr, delta_ptr, gate_ptr, A_ptr, B_ptr, C_ptr, hc_ptr, dy_ptr, dht_ptr,
    du_ptr, ddelta_ptr, dA_part_ptr, dB_ptr, dC_ptr, dbias_part_ptr, dh0_ptr, cu_ptr,
    tile_first_ptr, seg_seq_ptr, seg_idx_ptr,
    R, Dm, G, NS, SEG,
    BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, STORED_BT: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, SEGMENTED: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    i_g, i_b, o_d, m_d, o_s, m_s, m_ds, block = _pairs(Dm, G, NS, BD, BN)
    # tile0 counts the forward's stored tiles of STORED_BT rows.
    slot, seq, start, stop, tile0 = _span(
        cu_ptr, tile_first_ptr, seg_seq_ptr, seg_idx_ptr, SEG, STORED_BT, SEGMENTED
    )
    o_t = tl.arange(0, BT)
    channel_rows = o_d.to(tl.int64)[None, :] * R

    # `carry[:, n]` is the gradient flowing into the tile's last row from after it.
    carry, dA, dbias, num_tiles = _backward_start(
        dht_ptr, slot, seq, start, stop, block, m_ds, Dm, NS, BD, BN, BT, HAS_DHT, SEGMENTED
    )
    for j in range(0, num_tiles):
        c = num_tiles - 1 - j
        tile_start, rows, m_t, m_td = _tile(c, start, stop, m_d, BT)
        offsets = channel_rows + rows[:, None]
        # Masked rows and channels: delta = 0, so a = 1 and b = 0, and dy = 0.
        delta = tl.load(delta_ptr + offsets, mask=m_td, other=0.0)
        u = tl.load(u_ptr + offsets, mask=m_td, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=m_td, other=0.0)
        # a_{t+1} inside the tile; 0 at its last row, whose successor arrives as `carry`.
        has_next = (o_t < BT - 1) & (rows + 1 < stop)
        delta_next = tl.load(
            delta_ptr + offsets + 1, mask=has_next[:, None] & m_d[None, :], other=0.0
        )
        is_last = (o_t == tl.minimum(stop - tile_start, BT) - 1)[:, None]
        is_first = (o_t == 0)[:, None]
        x = delta * u
        du = tl.zeros([BT, BD], dtype=tl.float32)
        ddelta = tl.zeros([BT, BD], dtype=tl.float32)
        carry_in = tl.zeros([BD, BN], dtype=tl.float32)
        state_rows = (rows * G + i_g) * NS
        h_tile = hc_ptr + (tile0 + c * (BT // STORED_BT)) * Dm * NS + o_d * NS
        part = i_g * NS * R + rows
        for n in range(0, NS):
            is_n = (o_s == n)[None, :]
            A_n, B_n, C_n = _state_inputs(A_ptr, B_ptr, C_ptr, o_d, m_d, state_rows, m_t, n, NS)
            h_start = tl.load(h_tile + n, mask=m_d, other=0.0)
            a = tl.exp(delta * A_n[None, :])
            b = x * B_n
            a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
            states = a_cum * h_start[None, :] + b_cum
            # dh_t = dy_t C_t + a_{t+1} dh_{t+1}, seeded at the last row by the carry.
            a_next = tl.where(has_next[:, None], tl.exp(delta_next * A_n[None, :]), 0.0)
            carry_n = tl.sum(tl.where(is_n, carry, 0.0), axis=1)
            inflow = dy * C_n + tl.where(is_last, carry_n[None, :], 0.0)
            _, dh = tl.associative_scan((a_next, inflow), 0, _combine, reverse=True)

            decayed_prev = states - b  # a_t h_{t-1}
            du += dh * B_n
            ddelta += dh * (decayed_prev * A_n[None, :] + B_n * u)
            dA += tl.where(is_n, tl.sum(dh * decayed_prev * delta, axis=0)[:, None], 0.0)
            tl.atomic_add(dB_ptr + part + n * R, tl.sum(dh * x, axis=1), mask=m_t, sem="relaxed")
            tl.atomic_add(
                dC_ptr + part + n * R, tl.sum(dy * states, axis=1), mask=m_t, sem="relaxed"
            )
            # The gradient sent to the state entering the tile: a_0 dh_0, of its first row.
            sent = tl.sum(tl.where(is_first, a * dh, 0.0), axis=0)
            carry_in = tl.where(is_n, sent[:, None], carry_in)
        carry = carry_in
        du *= delta
        if HAS_GATE:  # the gradient of the raw step (+ bias): softplus' = sigmoid, given
            ddelta *= tl.load(gate_ptr + offsets, mask=m_td, other=0.0)
        tl.store(du_ptr + offsets, du.to(du_ptr.dtype.element_ty), mask=m_td)
        tl.store(ddelta_ptr + offsets, ddelta.to(ddelta_ptr.dtype.element_ty), mask=m_td)
        if HAS_BIAS:
            dbias += tl.sum(tl.where(m_td, ddelta, 0.0), axis=0)
    _store_sums(dA_part_ptr, dbias_part_ptr, dh0_ptr, dA, dbias, carry, slot, seq, block, m_ds,
                o_d, m_d, Dm, NS, HAS_BIAS, STORE_DH0)  # fmt: skip


PASS_BLOCK = 256  # (channel, state) pairs per program of the segment pass


def _segment_length(programs: int, per_sm, rows: int, num_seqs: int, device, BT: int):
    """Rows per segment for a launch of `programs` (channel blocks x sequences), or None: one
    program walks each whole sequence.

    Each program walks its rows tile after tile, a chain of dependent steps, so a launch with
    fewer programs than the GPU holds at once (`per_sm()` per multiprocessor, read from the
    compiled kernel's registers: `resident_programs`) leaves it idle however long the
    sequences are. Segments of at least MIN_SEGMENT rows, as many per sequence as still fit
    in one wave, make the launch that many times wider, for the price of a first pass over
    each segment from a zero state and a sequential pass over segment boundaries. None on CPU,
    and wherever the launch already fills the GPU or the sequences are too short to cut. The
    length is a multiple of 16 rows (and of BT), like the MIN_SEGMENT that `per_sm` compiles
    with: the launch then finds that binary. `benchmarks/selective_scan_launch_gpu.py
    --segments rule whole` times the rule against no segments.
    """
    if device.type != "cuda" or num_seqs == 0 or programs == 0:
        return None
    mean_length = rows // num_seqs
    if mean_length < 2 * MIN_SEGMENT:
        return None
    per_seq = sm_count(device) * per_sm() // programs
    if per_seq < 2:
        return None
    step = max(BT, 16)
    length = max(MIN_SEGMENT, triton.cdiv(triton.cdiv(mean_length, per_seq), step) * step)
    return length if length < mean_length else None


def _step_sizes(delta, bias, softplus: bool, gate: bool = False):
    """(step, sigmoid): the step softplus(delta + bias) `[R, Dm]` fp32, each part as asked,
    and, with `gate` and softplus, softplus' derivative sigmoid(delta + bias) (else None).

    Plain torch, elementwise, before the scan kernels rather than inside them: their tiles
    hold a [BT, BD] value in every one of the BN lanes that share its (token, channel), so
    each would compute softplus and sigmoid BN times over. Inside, at N=16 (H200, bf16, B=2,
    T=8192, Dm=1536), they cost the forward 30 registers a thread on Triton 3.6 (5 programs a
    multiprocessor instead of 8) and took forward + backward from about 11 to 14 ms. Nothing
    here is kept for the backward, which computes it again from delta: the price is transient
    fp32 `[R, Dm]` buffers, one in the forward and two in the backward, freed as each returns.
    """
    # One pass either way: a bf16 or fp16 delta plus an fp32 bias is computed and kept in fp32.
    x = delta.float() if bias is None else delta + bias.float()
    if not softplus:
        return x.contiguous(), None
    return F.softplus(x), (torch.sigmoid(x) if gate else None)


class SelectiveScanFunction(torch.autograd.Function):
    """Packed scan: u, delta `[R, Dm]` (delta the raw step), A `[Dm, N]` fp32, B, C
    `[R, G, N]`, h0 `[N_seq, Dm, N]` fp32 or None, bias `[Dm]` or None; softplus: the step is
    softplus(delta + bias); store_tiles: keep the state entering each tile for a backward.
    Returns y `[R, Dm]` fp32 (before the D skip and z gate) and the final state or None."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, bias, softplus, cu, fixed_length, output_final,
                store_tiles):  # fmt: skip
        R, Dm = u.shape
        G, N = B.shape[1], B.shape[2]
        kernel, launch, num_warps = _forward_launch(N, Dm // G)
        looped = kernel is _fwd_looped_kernel
        tiled = _launch(N, Dm // G)  # the tiles whose entering states are stored
        tiles = ChunkTable(cu, R, fixed_length, tiled["BT"])
        blocks = G * triton.cdiv(Dm // G, launch["BD"])
        f32 = {"dtype": torch.float32, "device": u.device}
        ht = torch.empty(tiles.num_seqs, Dm, N, **f32)
        if looped:  # channel-major, [Dm, R]; the step sizes of a channel-major delta are too
            dt, _ = _step_sizes(delta.t().contiguous().t(), bias, softplus)
            u_, dt_, y = u.t().contiguous(), dt.t().contiguous(), torch.empty(Dm, R, **f32)
            launch = {**launch, "R": R}
        else:
            dt, _ = _step_sizes(delta, bias, softplus)
            u_, dt_, y = u, dt, torch.empty(R, Dm, **f32)
        hc = torch.empty(tiles.bound, Dm, N, **f32) if store_tiles else y
        scan = {"Dm": Dm, "G": G, "NS": N, "num_warps": num_warps, **launch}

        def per_sm():  # the segmented main pass, as it launches below (ht: any fp32 stand-in)
            args = (u_, dt_, A, B, C, ht, y, hc, ht, cu, tiles.first, cu, cu)
            return resident_programs(kernel, args, {
                **scan, "SEG": MIN_SEGMENT, "HAS_H0": False, "STORE_FINAL": False,
                "STORE_TILES": store_tiles, "SEGMENTED": True,
            }, u.device)  # fmt: skip

        seg = _segment_length(blocks * tiles.num_seqs, per_sm, R, tiles.num_seqs, u.device,
                              launch["BT"])  # fmt: skip
        if seg is None:
            kernel[(blocks, tiles.num_seqs)](
                u_, dt_, A, B, C, u if h0 is None else h0, y, hc, ht, cu, tiles.first, cu, cu,
                SEG=0, HAS_H0=h0 is not None, STORE_FINAL=output_final, STORE_TILES=store_tiles,
                SEGMENTED=False, **scan,
            )  # fmt: skip
        else:
            segs = ChunkTable(cu, R, fixed_length, seg)
            tables = (cu, tiles.first, segs.seq, segs.idx)
            entering = torch.empty(segs.bound, Dm, N, **f32)
            dsum = torch.empty(segs.bound, Dm, **f32)
            # The first pass over segments walks the tiled forward's tiles, row-major.
            first_pass = {"Dm": Dm, "G": G, "NS": N, **tiled, "num_warps": FWD_WARPS}
            _fwd_segment_kernel[(G * triton.cdiv(Dm // G, tiled["BD"]), segs.bound)](
                u, dt.contiguous(), A, B, C, entering, dsum, *tables, SEG=seg, **first_pass
            )
            _segment_pass_kernel[(triton.cdiv(Dm * N, PASS_BLOCK), tiles.num_seqs)](
                A, entering, dsum, ht if h0 is None else h0, ht, cu, segs.first, Dm, N, seg,
                BLOCK=PASS_BLOCK, HAS_INIT=h0 is not None, STORE_FINAL=output_final,
                REVERSE=False,
            )  # fmt: skip
            kernel[(blocks, segs.bound)](
                u_, dt_, A, B, C, entering, y, hc, ht, *tables, SEG=seg, HAS_H0=False,
                STORE_FINAL=False, STORE_TILES=store_tiles, SEGMENTED=True, **scan,
            )  # fmt: skip
        if looped:
            y = y.t().contiguous()
        ctx.save_for_backward(u, delta, A, B, C, h0, bias, cu, hc, tiles.first)
        ctx.num_seqs, ctx.fixed_length, ctx.softplus = tiles.num_seqs, fixed_length, softplus
        return y, (ht if output_final else None)

    @staticmethod
    def backward(ctx, dy, dht):
        u, delta, A, B, C, h0, bias, cu, hc, tile_first = ctx.saved_tensors
        R, Dm = u.shape
        G, N = B.shape[1], B.shape[2]
        kernel, launch, num_warps = _backward_launch(N, Dm // G)
        looped = kernel is _bwd_looped_kernel
        blocks = triton.cdiv(Dm // G, launch["BD"])
        f32 = {"dtype": torch.float32, "device": u.device}
        dh0 = torch.empty(ctx.num_seqs, Dm, N, **f32)
        dht = None if dht is None else dht.float().contiguous()
        # The main pass's [R, Dm] tensors, and dB and dC: per channel block partials, or
        # (looped) the sums that every block adds to.
        if looped:
            # Channel-major, [Dm, R]: one transposing pass each. The step sizes of a
            # channel-major delta come out channel-major.
            dt, gate = _step_sizes(delta.t().contiguous().t(), bias, ctx.softplus, gate=True)
            u_, dt_ = u.t().contiguous(), dt.t().contiguous()
            gate_ = dt_ if gate is None else gate.t().contiguous()  # read only with HAS_GATE
            dy_ = torch.empty(Dm, R, **f32).copy_(dy.t())
            du, ddelta = u.new_empty(Dm, R), delta.new_empty(Dm, R)
            dB_part, dC_part = torch.zeros(1, G, N, R, **f32), torch.zeros(1, G, N, R, **f32)
        else:
            dt, gate = _step_sizes(delta, bias, ctx.softplus, gate=True)
            dy = dy.float().contiguous()
            u_, dt_, dy_, gate_ = u, dt, dy, dt if gate is None else gate
            du, ddelta = torch.empty_like(u), torch.empty_like(delta)
            dB_part, dC_part = (torch.empty(blocks, R, G, N, **f32) for _ in range(2))
        flags = {"HAS_GATE": gate is not None, "HAS_BIAS": bias is not None}
        scan = {"Dm": Dm, "G": G, "NS": N, "num_warps": num_warps, **launch}

        def per_sm():  # the segmented main pass, as it launches below (dh0: any fp32 stand-in)
            args = (u_, dt_, gate_, A, B, C, hc, dy_, dh0, du, ddelta, dh0, dB_part, dC_part,
                    dh0, dh0, cu, tile_first, cu, cu)  # fmt: skip
            return resident_programs(kernel, args, {
                **scan, **flags, "R": R, "SEG": MIN_SEGMENT, "HAS_DHT": False,
                "STORE_DH0": False, "SEGMENTED": True,
            }, u.device)  # fmt: skip

        seg = _segment_length(G * blocks * ctx.num_seqs, per_sm, R, ctx.num_seqs, u.device,
                              launch["BT"])  # fmt: skip
        if seg is None:
            dA_part = torch.empty(ctx.num_seqs, Dm, N, **f32)
            dbias_part = torch.empty(ctx.num_seqs, Dm, **f32) if bias is not None else dA_part
            kernel[(G * blocks, ctx.num_seqs)](
                u_, dt_, gate_, A, B, C, hc, dy_, hc if dht is None else dht,
                du, ddelta, dA_part, dB_part, dC_part, dbias_part, dh0, cu, tile_first, cu, cu,
                R=R, SEG=0, HAS_DHT=dht is not None, STORE_DH0=h0 is not None, SEGMENTED=False,
                **scan, **flags,
            )  # fmt: skip
        else:
            segs = ChunkTable(cu, R, ctx.fixed_length, seg)
            tables = (cu, tile_first, segs.seq, segs.idx)
            carries = torch.empty(segs.bound, Dm, N, **f32)
            dsum = torch.empty(segs.bound, Dm, **f32)
            dA_part = torch.empty(segs.bound, Dm, N, **f32)
            dbias_part = torch.empty(segs.bound, Dm, **f32) if bias is not None else dA_part
            first_pass = {"Dm": Dm, "G": G, "NS": N, **_launch(N, Dm // G),
                          "num_warps": SEGMENT_WARPS}  # fmt: skip
            # Row-major step sizes and dy (for the tiled main pass, those it reads).
            dt_rows, dy_rows = dt.contiguous(), dy.float().contiguous()
            _bwd_segment_kernel[(G * triton.cdiv(Dm // G, first_pass["BD"]), segs.bound)](
                dt_rows, A, C, dy_rows, carries, dsum, *tables, SEG=seg, **first_pass
            )
            _segment_pass_kernel[(triton.cdiv(Dm * N, PASS_BLOCK), ctx.num_seqs)](
                A, carries, dsum, dh0 if dht is None else dht, dh0, cu, segs.first, Dm, N, seg,
                BLOCK=PASS_BLOCK, HAS_INIT=dht is not None, STORE_FINAL=h0 is not None,
                REVERSE=True,
            )  # fmt: skip
            kernel[(G * blocks, segs.bound)](
                u_, dt_, gate_, A, B, C, hc, dy_, carries,
                du, ddelta, dA_part, dB_part, dC_part, dbias_part, dh0, *tables, R=R,
                SEG=seg, HAS_DHT=False, STORE_DH0=False, SEGMENTED=True, **scan, **flags,
            )  # fmt: skip
        # Per slot (sequence or segment) sums of the raw step's gradient: the bias's.
        dbias = None if bias is None else dbias_part.sum(0).to(bias.dtype)
        if looped:  # back to [R, Dm] and [R, G, N]
            du, ddelta = du.t().contiguous(), ddelta.t().contiguous()
            dB, dC = dB_part[0].permute(2, 0, 1), dC_part[0].permute(2, 0, 1)
        else:
            dB, dC = dB_part.sum(0), dC_part.sum(0)
        return (
            du, ddelta, dA_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if h0 is None else dh0, dbias, None, None, None, None, None,
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
    h0 = None if initial_state is None else initial_state.float().contiguous()
    # The states entering each tile are kept only for a backward that can run.
    inputs = (u, delta, A, B, C, h0, delta_bias)
    store_tiles = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, final = SelectiveScanFunction.apply(
        u.reshape(batch * T, Dm), delta.reshape(batch * T, Dm), A.float(),
        B.reshape(batch * T, G, N), C.reshape(batch * T, G, N), h0, delta_bias,
        bool(delta_softplus), cu, fixed_length, output_final_state, store_tiles,
    )  # fmt: skip
    return skip_and_gate_triton(y.reshape(batch, T, Dm), u, D, z), final


# --------------------------------------------------------------------------------------
# AOT: representative launches (bf16 activations, fp32 states)
# --------------------------------------------------------------------------------------


def _register_aot_specs() -> None:
    types = {
        # delta_ptr is the step, fp32 (`_step_sizes`); ddelta is the raw step's dtype.
        **{f"{n}_ptr": "*bf16" for n in ("u", "B", "C", "du", "ddelta")},
        **{f"{n}_ptr": "*i32" for n in ("cu", "tile_first", "seg_seq", "seg_idx", "seg_first")},
    }
    whole = {"SEGMENTED": False}
    segmented = {"SEGMENTED": True}
    for N in (4, 16):
        # Mamba's call: delta's bias and softplus, whose gradient the backward finishes.
        fwd = _launch(N, 1536)
        bwd = {**_launch(N, 1536, backward=True), "HAS_GATE": True, "HAS_BIAS": True}
        looped_fwd = _looped_launch(N, 1536, LOOPED_FWD)
        looped = {**_looped_launch(N, 1536, LOOPED_BWD), "HAS_GATE": True, "HAS_BIAS": True}
        for name, kernel, constexprs, num_warps in (
            ("fwd", _fwd_kernel, {**fwd, **whole, "HAS_H0": True, "STORE_FINAL": True,
                                  "STORE_TILES": True}, FWD_WARPS),
            ("fwd-segmented", _fwd_kernel, {**fwd, **segmented, "HAS_H0": False,
                                            "STORE_FINAL": False, "STORE_TILES": True}, FWD_WARPS),
            ("fwd_segment", _fwd_segment_kernel, fwd, FWD_WARPS),
            ("bwd", _bwd_kernel, {**bwd, **whole, "HAS_DHT": True, "STORE_DH0": True}, BWD_WARPS),
            ("bwd-segmented", _bwd_kernel, {**bwd, **segmented, "HAS_DHT": False,
                                            "STORE_DH0": False}, BWD_WARPS),
            ("bwd_segment", _bwd_segment_kernel, fwd, SEGMENT_WARPS),
            ("fwd_looped", _fwd_looped_kernel, {**looped_fwd, **whole, "HAS_H0": True,
                                                "STORE_FINAL": True, "STORE_TILES": True},
             LOOPED_FWD[2]),
            ("fwd_looped-segmented", _fwd_looped_kernel, {**looped_fwd, **segmented,
                                                          "HAS_H0": False, "STORE_FINAL": False,
                                                          "STORE_TILES": True}, LOOPED_FWD[2]),
            ("bwd_looped", _bwd_looped_kernel, {**looped, **whole, "HAS_DHT": True,
                                                "STORE_DH0": True}, LOOPED_BWD[2]),
            ("bwd_looped-segmented", _bwd_looped_kernel, {**looped, **segmented,
                                                          "HAS_DHT": False, "STORE_DH0": False},
             LOOPED_BWD[2]),
        ):  # fmt: skip
            register_aot(
                AotSpec(
                    name=f"selective_scan_{name}-N{N}-BD{constexprs['BD']}",
                    kernel=kernel,
                    signature=aot_signature(kernel, constexprs, types),
                    constexprs=constexprs,
                    num_warps=num_warps,
                    multiple_of_16=("Dm",),
                )
            )
    constexprs = {"BLOCK": PASS_BLOCK, "HAS_INIT": True, "STORE_FINAL": True, "REVERSE": False}
    register_aot(
        AotSpec(
            name="selective_scan_segment_pass",
            kernel=_segment_pass_kernel,
            signature=aot_signature(_segment_pass_kernel, constexprs, types),
            constexprs=constexprs,
            num_warps=4,
            multiple_of_16=("Dm",),
        )
    )


_register_aot_specs()
