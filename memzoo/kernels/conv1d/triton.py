"""Triton kernels for causal depthwise conv1d: forward, backward, final state, decode step.

Tokens are handled as the rows of x flattened to `[B * T, D]`; every token finds its own
sequence (row // T, or a lookup in the packed `cu_seqlens`), so a block of rows may span
sequences and nothing leaks across a boundary. Accumulation is fp32 whatever the input dtype.

Backward, with `g = dL/d(pre-activation output)` (recomputed by the forward kernel in its
GRAD mode when there is an activation):
  dx_t        = sum_w weight[w] * g_{t + W-1-w}  (same sequence only) + dfinal_state terms
  dweight[w]  = sum_t g_t * x_{t - (W-1-w)}       (inputs before the start from the state)
  dbias       = sum_t g_t
  dinit[i]    = sum_{p <= i} weight[i - p] * g_{start + p}  (+ dfinal passthrough for short
                sequences, whose final state still holds initial-state slots)
dweight / dbias are reduced per row block into fp32 partials and summed on the host side of
torch (deterministic; no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memzoo.kernels._core import AotSpec, aot_signature, autotune, register_aot

# Rows per program in the backward kernel. Fixed (not autotuned) because it sets the number of
# dweight partials the launcher allocates.
BWD_BLOCK_T = 32


def _fwd_configs():
    # 16 elements of the [BT, BD] tile per thread keeps every config far from spilling.
    return [
        triton.Config({"BT": 32, "BD": 64}, num_warps=4),
        triton.Config({"BT": 64, "BD": 64}, num_warps=8),
        triton.Config({"BT": 16, "BD": 128}, num_warps=4),
        triton.Config({"BT": 32, "BD": 128}, num_warps=8),
    ]


def _bwd_configs():
    # The backward holds more tiles per row (g, g ahead, x, dx): 8 elements per thread.
    return [
        triton.Config({"BD": 32}, num_warps=4),
        triton.Config({"BD": 64}, num_warps=8),
        triton.Config({"BD": 16}, num_warps=2),
    ]


@triton.jit
def _token_sequence(cu_ptr, seq_ptr, o_r, m_r, T, IS_VARLEN: tl.constexpr):
    """(sequence index, start row, length) of every row in o_r, all int64."""
    if IS_VARLEN:
        seq = tl.load(seq_ptr + o_r, mask=m_r, other=0).to(tl.int64)
        start = tl.load(cu_ptr + seq, mask=m_r, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=m_r, other=0).to(tl.int64)
        return seq, start, end - start
    seq = o_r // T
    return seq, seq * T, tl.zeros_like(o_r) + T


@triton.jit
def _sequence_bounds(cu_ptr, n, T, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence n (an int64 scalar)."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + n).to(tl.int64)
        return start, tl.load(cu_ptr + n + 1).to(tl.int64) - start
    return n * T, n * 0 + T


@triton.jit
def _look_back(
    x_ptr,
    init_ptr,
    o_r,
    seq,
    pos,
    o_d,
    m,
    D,
    LAG: tl.constexpr,
    W: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """fp32 tile [BT, BD] of the input LAG steps before each row (state slots before a start)."""
    inside = pos >= LAG
    ptrs = x_ptr + (o_r - LAG)[:, None] * D + o_d[None, :]
    values = tl.load(ptrs, mask=m & inside[:, None], other=0.0).to(tl.float32)
    if HAS_INIT:
        if LAG > 0:
            # State slots are oldest first: the input LAG steps back is slot W - 1 - LAG + pos.
            slot = W - 1 - LAG + pos
            state_ptrs = init_ptr + (seq[:, None] * D + o_d[None, :]) * (W - 1) + slot[:, None]
            before = (pos < LAG)[:, None]
            values += tl.load(state_ptrs, mask=m & before, other=0.0).to(tl.float32)
    return values


# One program: BT rows x BD channels of the output. Forward mode stores act(y); GRAD mode
# recomputes the pre-activation y and stores dy * act'(y) (fp32) for the backward kernel.
@triton.jit
def _conv1d_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    init_ptr,
    cu_ptr,
    seq_ptr,
    dy_ptr,
    out_ptr,
    rows,
    T,
    D,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SILU: tl.constexpr,
    GRAD: tl.constexpr,
):
    i_d, i_r = tl.program_id(0), tl.program_id(1)
    o_r = tl.cast(i_r, tl.int64) * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_r, m_d = o_r < rows, o_d < D
    m = m_r[:, None] & m_d[None, :]
    seq, start, _ = _token_sequence(cu_ptr, seq_ptr, o_r, m_r, T, IS_VARLEN)
    pos = o_r - start

    acc = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    for tap in tl.static_range(W):
        w = tl.load(w_ptr + o_d * W + tap, mask=m_d, other=0.0).to(tl.float32)
        x = _look_back(x_ptr, init_ptr, o_r, seq, pos, o_d, m, D, W - 1 - tap, W, HAS_INIT)
        acc += x * w[None, :]

    offsets = o_r[:, None] * D + o_d[None, :]
    if GRAD:
        dy = tl.load(dy_ptr + offsets, mask=m, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(acc)
            dy = dy * sig * (1.0 + acc * (1.0 - sig))
        tl.store(out_ptr + offsets, dy, mask=m)
    else:
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=m)


# One program: BD channels of one sequence's final state (its last W - 1 inputs, fp32).
@triton.jit
def _conv1d_final_state_kernel(
    x_ptr,
    init_ptr,
    cu_ptr,
    final_ptr,
    T,
    D,
    W: tl.constexpr,
    BD: tl.constexpr,
    HAS_INIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    n = tl.cast(i_n, tl.int64)
    start, length = _sequence_bounds(cu_ptr, n, T, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    state_base = (n * D + o_d) * (W - 1)
    for slot in tl.static_range(W - 1):
        pos = length - (W - 1) + slot
        value = tl.load(x_ptr + (start + pos) * D + o_d, mask=m_d & (pos >= 0), other=0.0)
        value = value.to(tl.float32)
        if HAS_INIT:
            # A sequence shorter than W - 1 keeps part of its initial state.
            from_init = tl.load(
                init_ptr + state_base + slot + length, mask=m_d & (pos < 0), other=0.0
            )
            value += from_init.to(tl.float32)
        tl.store(final_ptr + state_base + slot, value, mask=m_d)


# One program: BT rows x BD channels of dx, plus that row block's dweight/dbias partials.
@triton.jit
def _conv1d_bwd_kernel(
    x_ptr,
    w_ptr,
    init_ptr,
    cu_ptr,
    seq_ptr,
    g_ptr,
    dfinal_ptr,
    dx_ptr,
    dw_part_ptr,
    db_part_ptr,
    rows,
    T,
    D,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_d, i_r = tl.program_id(0), tl.program_id(1)
    o_r = tl.cast(i_r, tl.int64) * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_r, m_d = o_r < rows, o_d < D
    m = m_r[:, None] & m_d[None, :]
    seq, start, length = _token_sequence(cu_ptr, seq_ptr, o_r, m_r, T, IS_VARLEN)
    pos = o_r - start

    g = tl.load(g_ptr + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    part_base = (tl.cast(i_r, tl.int64) * D + o_d) * W
    for tap in tl.static_range(W):
        w = tl.load(w_ptr + o_d * W + tap, mask=m_d, other=0.0).to(tl.float32)
        # Row t reaches output t + (W - 1 - tap) through this tap, if it is in its sequence.
        ahead = (pos + (W - 1 - tap) < length)[:, None]
        g_ahead = tl.load(
            g_ptr + (o_r + (W - 1 - tap))[:, None] * D + o_d[None, :], mask=m & ahead, other=0.0
        )
        dx += g_ahead.to(tl.float32) * w[None, :]
        x = _look_back(x_ptr, init_ptr, o_r, seq, pos, o_d, m, D, W - 1 - tap, W, HAS_INIT)
        tl.store(dw_part_ptr + part_base + tap, tl.sum(g * x, axis=0), mask=m_d)
    if HAS_BIAS:
        tl.store(db_part_ptr + tl.cast(i_r, tl.int64) * D + o_d, tl.sum(g, axis=0), mask=m_d)
    if HAS_DFINAL:
        # The final state's slot i is the input at position length - (W - 1) + i.
        slot = pos - length + W - 1
        dfinal_ptrs = dfinal_ptr + (seq[:, None] * D + o_d[None, :]) * (W - 1) + slot[:, None]
        dx += tl.load(dfinal_ptrs, mask=m & (slot >= 0)[:, None], other=0.0).to(tl.float32)
    tl.store(dx_ptr + o_r[:, None] * D + o_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


# One program: BD channels of one sequence's initial-state gradient.
@triton.jit
def _conv1d_dinit_kernel(
    w_ptr,
    cu_ptr,
    g_ptr,
    dfinal_ptr,
    dinit_ptr,
    T,
    D,
    W: tl.constexpr,
    BD: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    n = tl.cast(i_n, tl.int64)
    start, length = _sequence_bounds(cu_ptr, n, T, IS_VARLEN)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    state_base = (n * D + o_d) * (W - 1)
    for slot in tl.static_range(W - 1):
        # Slot i is read by the sequence's first i + 1 outputs, through tap i - p at position p.
        acc = tl.zeros([BD], dtype=tl.float32)
        for p in tl.static_range(slot + 1):
            w = tl.load(w_ptr + o_d * W + (slot - p), mask=m_d, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + (start + p) * D + o_d, mask=m_d & (p < length), other=0.0)
            acc += w * g.to(tl.float32)
        if HAS_DFINAL:
            kept = slot - length
            dfinal = tl.load(dfinal_ptr + state_base + kept, mask=m_d & (kept >= 0), other=0.0)
            acc += dfinal.to(tl.float32)
        tl.store(dinit_ptr + state_base + slot, acc, mask=m_d)


# One program: BD channels of one batch entry's decode step (output and shifted state).
@triton.jit
def _conv1d_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    new_state_ptr,
    D,
    W: tl.constexpr,
    BD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    b = tl.cast(i_b, tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    state_base = (b * D + o_d) * (W - 1)
    x = tl.load(x_ptr + b * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    for slot in tl.static_range(W - 1):
        value = tl.load(state_ptr + state_base + slot, mask=m_d, other=0.0).to(tl.float32)
        acc += value * tl.load(w_ptr + o_d * W + slot, mask=m_d, other=0.0).to(tl.float32)
        if slot > 0:
            tl.store(new_state_ptr + state_base + slot - 1, value, mask=m_d)
    acc += x * tl.load(w_ptr + o_d * W + W - 1, mask=m_d, other=0.0).to(tl.float32)
    tl.store(new_state_ptr + state_base + W - 2, x, mask=m_d)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * D + o_d, acc.to(y_ptr.dtype.element_ty), mask=m_d)


_conv1d_fwd = autotune(_fwd_configs(), key=["D", "W"])(_conv1d_fwd_kernel)
_conv1d_bwd = autotune(_bwd_configs(), key=["D", "W"])(_conv1d_bwd_kernel)


def _block_d(D: int) -> int:
    return min(128, triton.next_power_of_2(D))


class _Packing:
    """Where each flattened row's sequence lives: fixed-length rows or packed cu_seqlens."""

    def __init__(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None):
        B, T, _ = x.shape
        self.rows, self.T = B * T, T
        self.cu_seqlens = cu_seqlens
        if cu_seqlens is None:
            self.num_seqs, self.seq_idx = B, None
        else:
            # Per-row sequence index, computed on the device (no host sync).
            rows = torch.arange(self.rows, dtype=torch.int32, device=x.device)
            self.num_seqs = cu_seqlens.numel() - 1
            self.seq_idx = torch.searchsorted(cu_seqlens[1:], rows, right=True).to(torch.int32)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens is not None

    def pointers(self, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cu_seqlens is None:
            return fallback, fallback
        return self.cu_seqlens, self.seq_idx


def _forward(x, weight, bias, initial_state, packing, silu, dy=None):
    """act(conv(x)) in x's dtype, or (with dy) the fp32 gradient of the pre-activation."""
    D, W = weight.shape
    out = torch.empty(x.shape, dtype=x.dtype if dy is None else torch.float32, device=x.device)
    cu, seq_idx = packing.pointers(x)
    if packing.rows > 0:

        def grid(meta):
            return (triton.cdiv(D, meta["BD"]), triton.cdiv(packing.rows, meta["BT"]))

        _conv1d_fwd[grid](
            x,
            weight,
            x if bias is None else bias,
            x if initial_state is None else initial_state,
            cu,
            seq_idx,
            x if dy is None else dy,
            out,
            packing.rows,
            packing.T,
            D,
            W=W,
            HAS_BIAS=bias is not None,
            HAS_INIT=initial_state is not None,
            IS_VARLEN=packing.is_varlen,
            SILU=silu,
            GRAD=dy is not None,
        )
    return out


def _final_state(x, weight, initial_state, packing):
    D, W = weight.shape
    final = torch.empty(packing.num_seqs, D, W - 1, dtype=torch.float32, device=x.device)
    BD = _block_d(D)
    cu, _ = packing.pointers(x)
    _conv1d_final_state_kernel[(triton.cdiv(D, BD), packing.num_seqs)](
        x,
        x if initial_state is None else initial_state,
        cu,
        final,
        packing.T,
        D,
        W=W,
        BD=BD,
        HAS_INIT=initial_state is not None,
        IS_VARLEN=packing.is_varlen,
    )
    return final


class CausalConv1dFunction(torch.autograd.Function):
    """Autograd wrapper: inputs are already checked and contiguous (see conv1d.causal_conv1d)."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, cu_seqlens, silu, output_final_state):
        packing = _Packing(x, cu_seqlens)
        y = _forward(x, weight, bias, initial_state, packing, silu)
        final = _final_state(x, weight, initial_state, packing) if output_final_state else None
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
        ctx.silu = silu
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
        packing = _Packing(x, cu_seqlens)
        D, W = weight.shape
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        if ctx.silu:
            g = _forward(x, weight, bias, initial_state, packing, True, dy=dy)
        else:
            g = dy
        dx = torch.empty_like(x)
        num_blocks = triton.cdiv(packing.rows, BWD_BLOCK_T)
        dw_part = torch.empty(num_blocks, D, W, dtype=torch.float32, device=x.device)
        db_part = torch.empty(num_blocks, D, dtype=torch.float32, device=x.device)
        cu, seq_idx = packing.pointers(x)
        if packing.rows > 0:
            _conv1d_bwd[lambda meta: (triton.cdiv(D, meta["BD"]), num_blocks)](
                x,
                weight,
                x if initial_state is None else initial_state,
                cu,
                seq_idx,
                g,
                x if dfinal is None else dfinal,
                dx,
                dw_part,
                db_part,
                packing.rows,
                packing.T,
                D,
                W=W,
                BT=BWD_BLOCK_T,
                HAS_BIAS=bias is not None,
                HAS_INIT=initial_state is not None,
                HAS_DFINAL=dfinal is not None,
                IS_VARLEN=packing.is_varlen,
            )
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = None if bias is None else db_part.sum(0).to(bias.dtype)
        dinit = None
        if initial_state is not None and ctx.needs_input_grad[3]:
            dinit = torch.empty(packing.num_seqs, D, W - 1, dtype=torch.float32, device=x.device)
            BD = _block_d(D)
            _conv1d_dinit_kernel[(triton.cdiv(D, BD), packing.num_seqs)](
                weight,
                cu,
                g,
                x if dfinal is None else dfinal,
                dinit,
                packing.T,
                D,
                W=W,
                BD=BD,
                HAS_DFINAL=dfinal is not None,
                IS_VARLEN=packing.is_varlen,
            )
            dinit = dinit.to(initial_state.dtype)
        return dx, dweight, dbias, dinit, None, None, None


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def causal_conv1d_triton(
    x, weight, bias, activation, initial_state, output_final_state, cu_seqlens
):
    """Triton causal conv1d; same contract as `memzoo.kernels.conv1d.causal_conv1d`."""
    return CausalConv1dFunction.apply(
        x, weight, bias, initial_state, cu_seqlens, activation == "silu", output_final_state
    )


@torch.compiler.disable  # eager under torch.compile: see memzoo.kernels
def causal_conv1d_update_triton(x, conv_state, weight, bias, activation):
    """Triton decode step; same contract as `memzoo.kernels.conv1d.causal_conv1d_update`."""
    B, D = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    new_state = torch.empty(B, D, W - 1, dtype=torch.float32, device=x.device)
    BD = _block_d(D)
    _conv1d_update_kernel[(triton.cdiv(D, BD), B)](
        x,
        conv_state,
        weight,
        x if bias is None else bias,
        y,
        new_state,
        D,
        W=W,
        BD=BD,
        HAS_BIAS=bias is not None,
        SILU=activation == "silu",
    )
    return y, new_state


def _aot(name, kernel, dtype, constexprs, *, num_warps=4, aligned=False, fp32_out=False):
    """Register one AOT launch. Pointers to activations (x, dy, out, dx, y) get `dtype`
    (fp32 for a GRAD-mode output), offsets int32, everything else fp32; integers are i32."""
    activations = {"x_ptr", "dy_ptr", "dx_ptr", "y_ptr"} | (set() if fp32_out else {"out_ptr"})
    types = {**{a: f"*{dtype}" for a in activations}, "cu_ptr": "*i32", "seq_ptr": "*i32"}
    signature = aot_signature(kernel, constexprs, types)
    suffix = "-D16x" if aligned else ""
    register_aot(
        AotSpec(
            name=f"{name}-{dtype}{suffix}",
            kernel=kernel,
            signature=signature,
            constexprs=constexprs,
            num_warps=num_warps,
            multiple_of_16=("D",) if aligned else (),
        )
    )


def _register_aot_specs() -> None:
    """Representative launches: width 4 (Mamba) with silu and bias, an initial state, bf16
    (fp16 for the default config), fixed-length and packed; D both a multiple of 16 (as
    Triton specializes model widths) and not."""
    flags = {"W": 4, "HAS_BIAS": True, "HAS_INIT": True, "SILU": True}
    for aligned in (True, False):
        for config in _fwd_configs():
            BT, BD = config.kwargs["BT"], config.kwargs["BD"]
            for varlen in (False, True):
                _aot(
                    f"conv1d_fwd-W4-BT{BT}-BD{BD}{'-varlen' if varlen else ''}",
                    _conv1d_fwd_kernel,
                    "bf16",
                    {**flags, "BT": BT, "BD": BD, "IS_VARLEN": varlen, "GRAD": False},
                    num_warps=config.num_warps,
                    aligned=aligned,
                )
        for config in _bwd_configs():
            BD = config.kwargs["BD"]
            _aot(
                f"conv1d_bwd-W4-BT{BWD_BLOCK_T}-BD{BD}-varlen",
                _conv1d_bwd_kernel,
                "bf16",
                {
                    "W": 4,
                    "BT": BWD_BLOCK_T,
                    "BD": BD,
                    "HAS_BIAS": True,
                    "HAS_INIT": True,
                    "HAS_DFINAL": True,
                    "IS_VARLEN": True,
                },
                num_warps=config.num_warps,
                aligned=aligned,
            )
        default = _fwd_configs()[0]
        BT, BD = default.kwargs["BT"], default.kwargs["BD"]
        _aot(
            f"conv1d_fwd_grad-W4-BT{BT}-BD{BD}",
            _conv1d_fwd_kernel,
            "bf16",
            {**flags, "BT": BT, "BD": BD, "IS_VARLEN": False, "GRAD": True},
            num_warps=default.num_warps,
            aligned=aligned,
            fp32_out=True,
        )
    _aot(
        f"conv1d_fwd-W4-BT{BT}-BD{BD}",
        _conv1d_fwd_kernel,
        "fp16",
        {**flags, "BT": BT, "BD": BD, "IS_VARLEN": False, "GRAD": False},
        num_warps=default.num_warps,
    )
    _aot(
        "conv1d_final_state-W4-BD128",
        _conv1d_final_state_kernel,
        "bf16",
        {"W": 4, "BD": 128, "HAS_INIT": True, "IS_VARLEN": True},
    )
    _aot(
        "conv1d_dinit-W4-BD128",
        _conv1d_dinit_kernel,
        "bf16",
        {"W": 4, "BD": 128, "HAS_DFINAL": True, "IS_VARLEN": True},
    )
    _aot(
        "conv1d_update-W4-BD128",
        _conv1d_update_kernel,
        "bf16",
        {"W": 4, "BD": 128, "HAS_BIAS": True, "SILU": True},
    )


_register_aot_specs()
