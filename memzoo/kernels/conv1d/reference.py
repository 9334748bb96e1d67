"""Plain-torch causal depthwise conv1d: the oracle for the kernels and the CPU path.

Notation: x `[B, T, D]`, weight `[D, W]`, state `[N, D, W - 1]` holding the last W - 1 inputs
of a sequence (oldest first), so `y_t[d] = bias[d] + sum_w weight[d, w] * x_{t - (W - 1) + w}[d]`
where inputs before the start of a sequence come from its state (zeros without one).

Three forms, each checked against the others in tests:
- `conv1d_ref`: F.conv1d over the state-padded input (one call per batch).
- `conv1d_shift_ref`: a sum of W shifted copies of x with per-token sequence bookkeeping, which
  handles packed variable-length batches without host syncs or Python loops.
- `conv1d_recurrent_ref`: token by token through `conv1d_update_ref`, the decode step.
All compute in fp32 (fp64 for fp64 inputs); outputs come back in x's dtype, states in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv of x `[B, T, D]` through F.conv1d; returns (y, final_state or None)."""
    B, T, D = x.shape
    W = weight.shape[1]
    dtype = _compute_dtype(x)
    if initial_state is None:
        initial_state = x.new_zeros(B, D, W - 1, dtype=dtype)
    padded = torch.cat([initial_state.to(dtype), x.to(dtype).transpose(1, 2)], dim=2)
    final_state = padded[:, :, T:] if output_final_state else None
    if T == 0:  # F.conv1d rejects inputs shorter than the kernel
        return x.new_zeros(B, 0, D), final_state
    y = F.conv1d(
        padded,
        weight.to(dtype).unsqueeze(1),
        None if bias is None else bias.to(dtype),
        groups=D,
    )
    return _activate(y, activation).transpose(1, 2).to(x.dtype), final_state


def _sequence_offsets(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """int64 offsets `[N + 1]` of the sequences in the flattened tokens of x `[B, T, D]`."""
    B, T, _ = x.shape
    if cu_seqlens is None:
        return torch.arange(B + 1, device=x.device) * T
    return cu_seqlens.long()


def _look_back(
    flat_x: torch.Tensor,
    state: torch.Tensor | None,
    rows: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    lag: int,
) -> torch.Tensor:
    """The input `lag` steps before token `rows` (at position `pos` of sequence `seq`)."""
    inside = (pos >= lag).unsqueeze(1)
    if flat_x.shape[0] == 0:  # nothing to index: every input comes from the state
        values = flat_x.new_zeros(rows.shape[0], flat_x.shape[1])
    else:
        values = torch.where(inside, flat_x[(rows - lag).clamp(min=0)], 0.0)
    if state is not None and lag > 0:
        # Before the sequence start: state slot W - 1 - lag + pos (oldest slot first).
        slot = (state.shape[2] - lag + pos).clamp(0, state.shape[2] - 1)
        values = values + torch.where(inside, 0.0, state[seq, :, slot])
    return values


def conv1d_shift_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv as a sum of shifted inputs; supports packed sequences.

    x `[B, T, D]` (B == 1 with cu_seqlens `[N + 1]`), states `[N, D, W - 1]`.
    """
    B, T, D = x.shape
    W = weight.shape[1]
    dtype = _compute_dtype(x)
    flat_x = x.reshape(B * T, D).to(dtype)
    state = None if initial_state is None else initial_state.to(dtype)
    offsets = _sequence_offsets(x, cu_seqlens)
    rows = torch.arange(B * T, device=x.device)
    seq = torch.searchsorted(offsets[1:], rows, right=True)
    pos = rows - offsets[seq]
    w = weight.to(dtype)
    y = torch.zeros_like(flat_x) if bias is None else bias.to(dtype).expand(B * T, D).clone()
    for tap in range(W):
        y = y + w[:, tap] * _look_back(flat_x, state, rows, seq, pos, W - 1 - tap)
    y = _activate(y, activation).reshape(B, T, D).to(x.dtype)
    if not output_final_state:
        return y, None
    # Final slot i holds the input at position len - (W - 1) + i: look back from "position len".
    # (lags >= 1, so only real rows are read.)
    ends, lengths = offsets[1:], offsets[1:] - offsets[:-1]
    seq_ids = torch.arange(ends.shape[0], device=x.device)
    slots = [_look_back(flat_x, state, ends, seq_ids, lengths, W - 1 - i) for i in range(W - 1)]
    final_state = torch.stack(slots, dim=2)
    return y, final_state


def conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: x `[B, D]`, conv_state `[B, D, W - 1]` -> (y `[B, D]`, new state)."""
    dtype = _compute_dtype(x)
    window = torch.cat([conv_state.to(dtype), x.to(dtype).unsqueeze(2)], dim=2)
    y = (window * weight.to(dtype)).sum(dim=2)
    if bias is not None:
        y = y + bias.to(dtype)
    return _activate(y, activation).to(x.dtype), window[:, :, 1:]


def conv1d_recurrent_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form: x `[B, T, D]` -> (y, final state), through the decode step."""
    B, T, D = x.shape
    W = weight.shape[1]
    state = initial_state
    if state is None:
        state = x.new_zeros(B, D, W - 1, dtype=_compute_dtype(x))
    outputs = []
    for t in range(T):
        y_t, state = conv1d_update_ref(x[:, t], state, weight, bias, activation)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1), state
