"""The note pool of a decoding MemMamba layer: a ring buffer of K notes, first in, first out.

A pool is a tensor `[B, K, ...]` and a count `[B]` (int64) of the notes ever written to it.
Note number n (0-based, in time order) lives in slot n mod K until note n + K replaces it, so
the valid slots are `[0, min(count, K))` and, when the pool is full, the oldest note sits in
slot `count mod K`. A softmax read does not care about slot order (`note_attention_step`); a
chunk of several tokens needs the notes in time order (`pool_window`) ahead of its own,
compacted notes (`compact_notes`), so that `note_attention`'s rank band applies.
"""

from __future__ import annotations

import torch

__all__ = ["compact_notes", "pool_window", "pool_write"]


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """index `[B, N]` broadcast over the trailing feature dims of `like` `[B, *, ...]`."""
    return index.view(*index.shape, *([1] * (like.dim() - 2))).expand(*index.shape, *like.shape[2:])


def pool_write(
    pool: torch.Tensor, count: torch.Tensor, notes: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the selected notes of a chunk, in time order, to a ring-buffer pool.

    Args:
        pool: `[B, K, ...]`, the ring buffer.
        count: `[B]` int64, notes written so far.
        notes: `[B, T, ...]`, one candidate note per token of the chunk.
        selected: `[B, T]` bool, which tokens write their note.

    Returns:
        (new pool, new count); the inputs are not modified. Only the last K selected notes of
        the chunk can survive, so only they are written (each to its own slot: no write
        conflicts, deterministic on every device).
    """
    K = pool.shape[1]
    chosen = selected.long()
    rank = torch.cumsum(chosen, dim=1) - chosen  # chunk-local rank of each selected note
    written = chosen.sum(dim=1)
    survives = selected & (rank >= (written - K)[:, None])
    # Notes that do not survive go to a spare slot K, cut off below.
    slot = torch.where(survives, (count[:, None] + rank) % K, K)
    spare = pool.new_zeros(pool.shape[0], 1, *pool.shape[2:])
    extended = torch.cat([pool, spare], dim=1)
    extended = extended.scatter(1, _expand_index(slot, notes), notes.to(pool.dtype))
    return extended[:, :K], count + written


def pool_window(pool: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's notes oldest first: (window `[B, K, ...]`, num_valid `[B]` int64).

    Slots `[0, num_valid)` of the window hold the last min(count, K) notes in time order; the
    rest hold stale or zero slots that no reader sees.
    """
    K = pool.shape[1]
    num_valid = count.clamp(max=K)
    oldest = count - num_valid
    slots = (oldest[:, None] + torch.arange(K, device=pool.device)) % K
    return pool.gather(1, _expand_index(slots, pool)), num_valid


def compact_notes(
    notes: torch.Tensor,
    positions: torch.Tensor,
    *,
    prefix: torch.Tensor | None = None,
    prefix_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Notes of the selected tokens in rank order, optionally after a pool's window.

    Args:
        notes: `[B, T, ...]`, one note per token.
        positions: `[B, T]` int32 from `select_notes`: the token of each rank (T past the
            last selected one).
        prefix: `[B, P, ...]` notes that come first (a `pool_window`), or None.
        prefix_valid: `[B]`, how many leading prefix slots are notes (needed with prefix).

    Returns:
        `[B, P + T, ...]` (P = 0 without a prefix): slot j holds prefix note j for
        j < prefix_valid, then the chunk's selected notes in time order. Slots past the last
        note hold copies that `note_attention` never reads, given counts
        `prefix_valid + counts` for the chunk's tokens.
    """
    B, T = positions.shape
    if T == 0:
        return notes if prefix is None else prefix
    gathered_positions = positions.long().clamp(max=T - 1)
    if prefix is None:
        return notes.gather(1, _expand_index(gathered_positions, notes))
    P = prefix.shape[1]
    slot = torch.arange(P + T, device=notes.device).expand(B, P + T)
    valid = prefix_valid.long()[:, None]
    from_chunk = slot >= valid
    chunk_rank = (slot - valid).clamp(0, T - 1)
    token = gathered_positions.gather(1, chunk_rank)
    index = torch.where(from_chunk, P + token, slot.clamp(max=max(P - 1, 0)))
    source = torch.cat([prefix, notes.to(prefix.dtype)], dim=1)
    return source.gather(1, _expand_index(index, source))
