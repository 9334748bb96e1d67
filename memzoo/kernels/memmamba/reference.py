"""Plain-torch note selection and note attention: the oracle and the CPU path.

Notation per row (batch entry, or the whole packed row with cu_seqlens): `counts[t]` notes were
written before token t (ranks 0 .. counts[t] - 1 of the compacted note sequence), and token t
reads the ranks `r` with `lo[t] <= r < counts[t]`, where
`lo[t] = max(counts[t] - K, first rank of t's sequence)`: the last K notes of its own sequence
written strictly before it.

Three forms of the read, which must agree:
- `note_attention_ref`: a dense `[T, S]` mask over every (token, note) pair (the oracle);
- `note_attention_chunked`: each block of C tokens gathers the band of K + C ranks it can see
  (memory O(T (K + C)), the CPU path);
- `note_attention_recurrent`: token by token over a ring buffer of K notes, the read before the
  write of the same token (what decoding does).
"""

from __future__ import annotations

import torch

from memzoo.kernels.memmamba.pool import pool_write

DEFAULT_CHUNK = 64


def select_notes_ref(scores: torch.Tensor, tau1: float):
    """(counts, positions, totals) of `memzoo.kernels.memmamba.select_notes`; see its docstring.

    The exclusive prefix sum and the scatter run on the tensors' device: no host sync.
    """
    B, T = scores.shape
    selected = scores > tau1
    inclusive = torch.cumsum(selected.to(torch.int32), dim=1, dtype=torch.int32)
    counts = inclusive - selected.to(torch.int32)
    totals = inclusive[:, -1] if T > 0 else torch.zeros(B, dtype=torch.int32, device=scores.device)
    # Token t of rank counts[t] goes to slot counts[t]; unselected tokens go to a spare slot T
    # that is cut off, so every kept slot is written at most once (deterministic).
    slot = torch.where(selected, counts, T).long()
    source = torch.arange(T, dtype=torch.int32, device=scores.device).expand(B, T)
    positions = torch.full((B, T + 1), T, dtype=torch.int32, device=scores.device)
    positions = positions.scatter(1, slot, source)[:, :T]
    return counts, positions, totals


def visible_range(counts: torch.Tensor, capacity: int, cu_seqlens: torch.Tensor | None):
    """lo `[B, T]` (int64): the first rank each token may read (see the module docstring)."""
    counts = counts.long()
    lo = counts - capacity
    T = counts.shape[1]
    if cu_seqlens is None or T == 0:
        return lo.clamp(min=0)
    positions = torch.arange(T, device=counts.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    first_rank = counts[0, cu_seqlens[:-1].long().clamp(max=max(T - 1, 0))]
    return torch.maximum(lo, first_rank[seq].unsqueeze(0))


def _masked_softmax(scores: torch.Tensor, visible: torch.Tensor):
    """(p, lse): softmax of `scores` over its last dim restricted to `visible`, and the
    log-sum-exp of the visible scores. A row with nothing visible gets p = 0 and lse = -inf
    (no NaN, and no gradient flows through it)."""
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(
        nonempty, torch.log(safe_total) + row_max, torch.full_like(total, float("-inf"))
    )
    return weights / safe_total, lse.squeeze(-1)


def note_attention_ref(q, k, v, counts, capacity, scale, cu_seqlens=None):
    """Dense-mask oracle: q `[B, T, H, D]`, k `[B, S, H, D]`, v `[B, S, H, Dv]`, counts `[B, T]`.

    Returns o `[B, T, H, Dv]` in q's dtype and lse `[B, T, H]` (fp32, fp64 for fp64 inputs).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = k.shape[1]
    lo = visible_range(counts, capacity, cu_seqlens)
    ranks = torch.arange(S, device=q.device)
    visible = (ranks >= lo[..., None]) & (ranks < counts.long()[..., None])  # [B, T, S]
    scores = torch.einsum("bthd,bshd->bths", q.to(compute), k.to(compute)) * scale
    p, lse = _masked_softmax(scores, visible[:, :, None, :])
    return torch.einsum("bths,bshe->bthe", p, v.to(compute)).to(q.dtype), lse


def note_attention_chunked(q, k, v, counts, capacity, scale, cu_seqlens=None, chunk=DEFAULT_CHUNK):
    """Banded form of `note_attention_ref` (same arguments and results).

    Counts grow by at most one per token, so the ranks a block of C tokens can see lie in
    `[lo[first], lo[first] + K + C)`: each block gathers that band and masks it per token.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, D = q.shape
    S, Dv = k.shape[1], v.shape[-1]
    if T == 0 or S == 0:
        return (
            q.new_zeros(B, T, H, Dv),
            torch.full((B, T, H), float("-inf"), dtype=compute, device=q.device),
        )
    C = min(chunk, T)
    n_blocks = -(-T // C)
    pad = n_blocks * C - T
    lo = visible_range(counts, capacity, cu_seqlens)
    hi = counts.long()
    if pad:
        # Padding tokens see nothing: lo = hi = the last token's hi.
        hi = torch.cat([hi, hi[:, -1:].expand(B, pad)], dim=1)
        lo = torch.cat([lo, hi[:, -1:].expand(B, pad)], dim=1)
        q = torch.cat([q, q.new_zeros(B, pad, H, D)], dim=1)
    band = capacity + C
    start = lo.view(B, n_blocks, C)[:, :, 0]  # [B, n_blocks]
    ranks = start[..., None] + torch.arange(band, device=q.device)  # [B, n_blocks, band]
    index = ranks.clamp(max=S - 1).view(B, n_blocks * band)
    k_band = k.to(compute).gather(1, index[..., None, None].expand(-1, -1, H, D))
    v_band = v.to(compute).gather(1, index[..., None, None].expand(-1, -1, H, Dv))
    k_band = k_band.view(B, n_blocks, band, H, D)
    v_band = v_band.view(B, n_blocks, band, H, Dv)
    lo_blocks, hi_blocks = lo.view(B, n_blocks, C, 1), hi.view(B, n_blocks, C, 1)
    visible = (ranks[:, :, None, :] >= lo_blocks) & (ranks[:, :, None, :] < hi_blocks)
    scores = torch.einsum("bnchd,bnshd->bnchs", q.to(compute).view(B, n_blocks, C, H, D), k_band)
    p, lse = _masked_softmax(scores * scale, visible[:, :, :, None, :])
    o = torch.einsum("bnchs,bnshe->bnche", p, v_band).reshape(B, n_blocks * C, H, Dv)[:, :T]
    return o.to(q.dtype), lse.reshape(B, n_blocks * C, H)[:, :T]


def note_attention_step_ref(q, k_pool, v_pool, num_valid, scale):
    """One token's read of a pool: q `[B, H, D]`, pools `[B, K, H, D|Dv]`, num_valid `[B]`.

    Slots `[0, num_valid)` hold notes (their order does not matter to a softmax).
    Returns o `[B, H, Dv]` in q's dtype and lse `[B, H]`.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    K = k_pool.shape[1]
    visible = torch.arange(K, device=q.device) < num_valid.long()[:, None]  # [B, K]
    # At most K notes per row: elementwise products beat einsum's dispatch at decode sizes.
    scores = (q.to(compute).unsqueeze(1) * k_pool.to(compute)).sum(-1).transpose(1, 2) * scale
    p, lse = _masked_softmax(scores, visible[:, None, :])  # p: [B, H, K]
    o = (p.transpose(1, 2).unsqueeze(-1) * v_pool.to(compute)).sum(1)
    return o.to(q.dtype), lse


def note_attention_recurrent(q, k, v, selected, capacity, scale):
    """Token by token: read the ring buffer, then write token t's note if it is selected.

    q `[B, T, H, D]`; k `[B, T, H, D]`, v `[B, T, H, Dv]` the note of every token (only the
    selected ones are written); selected `[B, T]` bool. Returns (o, lse) as `note_attention`
    would for the compacted notes of the selected tokens.
    """
    B, T, H, D = q.shape
    pool_k = k.new_zeros(B, capacity, H, D)
    pool_v = v.new_zeros(B, capacity, H, v.shape[-1])
    count = torch.zeros(B, dtype=torch.long, device=q.device)
    outputs, lses = [], []
    for t in range(T):
        num_valid = count.clamp(max=capacity)
        o, lse = note_attention_step_ref(q[:, t], pool_k, pool_v, num_valid, scale)
        outputs.append(o)
        lses.append(lse)
        write = selected[:, t : t + 1]
        pool_k, _ = pool_write(pool_k, count, k[:, t : t + 1], write)
        pool_v, count = pool_write(pool_v, count, v[:, t : t + 1], write)
    return torch.stack(outputs, dim=1), torch.stack(lses, dim=1)
