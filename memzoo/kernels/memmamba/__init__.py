"""MemMamba's note pool: note selection with compaction, and the (banded) note attention.

A MemMamba layer writes a note for each token whose importance score passes tau1 and keeps the
last K notes (first in, first out). Token t reads, by softmax attention, the notes written
strictly before it that are still in the pool:

    selected_t = scores_t > tau1
    counts_t   = #{s < t : selected_s}                 (exclusive prefix sum, on the device)
    notes      = the selected tokens' notes in time order (rank r = 0, 1, ...)
    o_t        = sum_{r in [counts_t - K, counts_t)} softmax_r(scale q_t . k_r) v_r

The visible ranks of a block of tokens form one band of the compacted sequence, so the read is
a banded attention (Triton forward and backward; a chunked torch path on CPU). Decoding keeps
the pool as a ring buffer (`pool_write`, `pool_window`) and reads it with
`note_attention_step`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from memzoo.kernels._core import InputCheck, check_choice, register_op, resolve_backend
from memzoo.kernels.memmamba.pool import compact_notes, pool_window, pool_write
from memzoo.kernels.memmamba.reference import (
    note_attention_chunked,
    note_attention_step_ref,
    select_notes_ref,
)

__all__ = [
    "NoteSelection",
    "compact_notes",
    "note_attention",
    "note_attention_step",
    "pool_window",
    "pool_write",
    "select_notes",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


class NoteSelection(NamedTuple):
    """Which tokens write a note, in the compacted form `note_attention` reads.

    counts: `[B, T]` int32, notes written strictly before each token.
    positions: `[B, T]` int32, the token of each rank (`positions[b, r]` for
        r < totals[b]); T (one past the end) for the ranks no token fills.
    totals: `[B]` int32, notes written by the whole row.
    """

    counts: torch.Tensor
    positions: torch.Tensor
    totals: torch.Tensor


@register_op("torch")
def select_notes(scores: torch.Tensor, tau1: float) -> NoteSelection:
    """Select the tokens whose score exceeds tau1 and compact them, without host syncs.

    Args:
        scores: `[B, T]` floating importance scores (MemMamba: sigmoid outputs in (0, 1)).
        tau1: the write threshold; token t writes a note when scores[b, t] > tau1.

    Returns:
        `NoteSelection(counts, positions, totals)`, all int32 on the scores' device (an
        exclusive prefix sum and a scatter: two small device ops, so no Triton kernel).
        For sequences packed along T (B == 1 with cu_seqlens), counts and ranks run over the
        whole packed row; `note_attention(..., cu_seqlens=cu)` restarts the pool at each
        sequence start, so nothing is read across a boundary.

    Example::

        sel = select_notes(torch.sigmoid(logits), 0.5)
        k_notes = compact_notes(k, sel.positions)          # [B, T, H, D], rank order
        o = note_attention(q, k_notes, k_notes, sel.counts, capacity=64)
    """
    check = InputCheck("select_notes")
    scores = check.tensor("scores", scores, "B T")
    if not isinstance(tau1, (int, float)) or isinstance(tau1, bool):
        raise TypeError(f"select_notes: tau1 must be a float, got {type(tau1).__name__}")
    counts, positions, totals = select_notes_ref(scores, float(tau1))
    return NoteSelection(counts, positions, totals)


def _check_capacity(op: str, capacity) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"{op}: capacity (the pool size K) must be an int >= 1, got {capacity!r}")
    return capacity


def _check_counts(check: InputCheck, counts: torch.Tensor, S: int) -> None:
    """counts start at >= 0, grow by 0 or 1 per token, and never pass the S notes given."""
    if counts.shape[1] == 0:
        return
    steps = counts[:, 1:] - counts[:, :-1]
    first, last = counts[:, 0], counts[:, -1]
    if check.on_host(counts):
        if bool((first < 0).any()):
            raise check.error(f"counts must be >= 0, got {int(first.min())} at t = 0")
        if bool(((steps < 0) | (steps > 1)).any()):
            raise check.error(
                "counts must grow by 0 or 1 from one token to the next (a token writes at most "
                "one note), as select_notes returns them"
            )
        if bool((last > S).any()):
            raise check.error(
                f"counts reach {int(last.max())} but k and v hold only S={S} notes per row"
            )
    else:
        torch._assert_async((first >= 0).all(), "note_attention: counts must be >= 0")
        torch._assert_async(
            ((steps >= 0) & (steps <= 1)).all(), "note_attention: counts must grow by 0 or 1"
        )
        torch._assert_async((last <= S).all(), "note_attention: counts must not exceed S")


@register_op("torch", "triton")
def note_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    capacity: int,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Each token attends, by softmax, to the last `capacity` notes written before it.

    Token t of row b reads the compacted notes of ranks r with
        max(counts[b, t] - capacity, first) <= r < counts[b, t]
    where first = 0, or with cu_seqlens the first rank of t's sequence (counts at its start).
    A token that sees no note reads o = 0 (lse = -inf); nothing is NaN.

    Args:
        q: `[B, T, H, D]` queries.
        k: `[B, S, H, D]` note keys in rank order (e.g. `compact_notes`); same dtype as q.
        v: `[B, S, H, Dv]` note values in rank order; same dtype as q.
        counts: `[B, T]` int32, notes written before each token: >= 0, growing by 0 or 1 per
            token, at most S (`select_notes(...).counts`, plus the number of pool notes placed
            before the chunk's own when decoding in chunks).
        capacity: the pool size K >= 1.
        scale: multiplies q . k; default D^-1/2.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (then B must be 1),
            with counts and ranks running over the whole packed row (as select_notes gives).
        return_lse: also return the log-sum-exp of the visible scores (differentiable), so
            reads of several pools can be merged into one softmax.
        backend: "auto", "torch" or "triton".

    Returns:
        o `[B, T, H, Dv]` in q's dtype and, if asked, lse `[B, T, H]` (fp32; fp64 for fp64
        inputs on the torch path).

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes, devices, counts,
        capacity or cu_seqlens; BackendUnavailableError when `backend` cannot run here.

    Example (a pool of 4 notes: each token reads at most the 4 latest notes before it)::

        sel = select_notes(scores, 0.5)                     # scores: [B, T]
        o = note_attention(q, compact_notes(k, sel.positions),
                           compact_notes(v, sel.positions), sel.counts, 4)
    """
    check = InputCheck("note_attention")
    q = check.tensor("q", q, "B T H D")
    k = check.tensor("k", k, "B S H D")
    v = check.tensor("v", v, "B S H Dv")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"note_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    counts = check.tensor("counts", counts, "B T", floating=False, dtypes=(torch.int32,))
    capacity = _check_capacity("note_attention", capacity)
    B, T, S = check.sizes["B"], check.sizes["T"], check.sizes["S"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    _check_counts(check, counts, S)
    scale = check.sizes["D"] ** -0.5 if scale is None else float(scale)

    backend = resolve_backend("note_attention", backend, q.device, q.dtype)
    if backend == "triton":
        from memzoo.kernels.memmamba.triton import note_attention_triton

        o, lse = note_attention_triton(q, k, v, counts, capacity, scale, cu_seqlens)
    else:
        o, lse = note_attention_chunked(q, k, v, counts, capacity, scale, cu_seqlens)
    return (o, lse) if return_lse else o


@register_op("torch")
def note_attention_step(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    num_valid: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """One decode step of `note_attention`: a token reads every note in its pool.

    Args:
        q: `[B, H, D]`, the new token's query.
        k_pool: `[B, K, H, D]`, v_pool: `[B, K, H, Dv]`, a ring buffer (`pool_write`) whose
            slots `[0, num_valid)` hold notes; a softmax does not depend on their order.
        num_valid: `[B]` int32/int64, min(notes written so far, K).
        scale, return_lse: as in `note_attention`.
        backend: "auto" or "torch" (one token reads at most K notes: a matrix-vector product).

    Returns:
        o `[B, H, Dv]` in q's dtype and, if asked, lse `[B, H]`; o = 0 and lse = -inf for a
        row whose pool is empty.
    """
    check = InputCheck("note_attention_step")
    q = check.tensor("q", q, "B H D")
    k_pool = check.tensor("k_pool", k_pool, "B K H D")
    v_pool = check.tensor("v_pool", v_pool, "B K H Dv")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"note_attention_step: {name} must have q's dtype {q.dtype}, got {t.dtype}"
            )
    num_valid = check.tensor("num_valid", num_valid, "B", floating=False, dtypes=_INDEX_DTYPES)
    check_choice("note_attention_step", "backend", backend, ("auto", "torch"))
    scale = check.sizes["D"] ** -0.5 if scale is None else float(scale)
    o, lse = note_attention_step_ref(q, k_pool, v_pool, num_valid, scale)
    return (o, lse) if return_lse else o
