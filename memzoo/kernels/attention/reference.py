"""Plain-torch softmax attention: the oracle for the kernels and the CPU path.

Query i of a sequence attends to key j when
    full, non-causal:   any j
    causal:             j <= i
    causal, window w:   i - w < j <= i       (the w most recent tokens, i included)
with o_i = softmax_j(scale * q_i . k_j) v_j. Query head h reads kv head h // (H // Hkv)
(grouped-query attention).

- `attention_ref`: the oracle. An explicit `[T, T]` boolean mask and a plain softmax.
- `attention_torch`: the CPU path, differentiable by autograd. Full attention goes through
  `torch.nn.functional.scaled_dot_product_attention`; windowed attention is blocked local
  attention (scaled_dot_product_attention over query blocks and their key windows) that never
  builds a `[T, T]` tensor: memory O(T (w + block)).
Both compute in fp32 (fp64 for fp64 inputs) and return o in q's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Repeat each kv head `groups` times along `dim`: head h lines up with kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def allowed_keys(T: int, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """`[T, T]` bool, True where query i (row) may attend to key j (column)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    if not causal:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention through the full `[T, T]` score matrix (no varlen): the oracle.

    q: `[B, T, H, D]`; k, v: `[B, T, Hkv, D]`. Returns o `[B, T, H, D]` in q's dtype.
    """
    dtype, out_dtype = _compute_dtype(q, k, v), q.dtype
    T, H, Hkv = q.shape[1], q.shape[2], k.shape[2]
    q = q.to(dtype).transpose(1, 2)  # [B, H, T, D]
    k, v = (_repeat_kv(x.to(dtype), H // Hkv, dim=2).transpose(1, 2) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed_keys(T, causal, window, q.device), float("-inf"))
    o = scores.softmax(dim=-1) @ v
    return o.transpose(1, 2).to(out_dtype)


# --------------------------------------------------------------------------------------
# The CPU path
# --------------------------------------------------------------------------------------


def _full_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Full (causal) attention: q `[B, T, H, D]`, k, v `[B, T, Hkv, D]`, all in one batch."""
    groups = q.shape[2] // k.shape[2]
    # Repeated kv heads, not SDPA's enable_gqa: that needs torch >= 2.5 (memzoo supports
    # 2.1), and the copies are no larger than q.
    q, k, v = (x.transpose(1, 2) for x in (q, _repeat_kv(k, groups, 2), _repeat_kv(v, groups, 2)))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return o.transpose(1, 2)


def default_block_size(window: int, H: int, Hkv: int, D: int, T: int) -> int:
    """Query block size C of the local path.

    Small blocks copy more (each copies its C + w - 1 keys and values), large blocks compute
    more (each query scores C + w - 1 keys, w of them allowed). C = sqrt(Hkv D w / H) was
    within 10% of the fastest of C = 16..512 on a 2-thread x86 CPU (T=8192, H=4, Hkv 1 or 4,
    D=64, w 16..1024, fp32 forward and backward). A multiple of 16, at least 16, at most T
    rounded up.
    """
    best = math.sqrt(Hkv * D * window / H)
    return max(16, min(16 * round(best / 16), 16 * math.ceil(T / 16)))


def _local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
    segment: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """Causal sliding-window attention, blocked: q `[B, T, H, D]`, k, v `[B, T, Hkv, D]`.

    Queries go in blocks of C; block n attends to the L = C + w - 1 keys at positions
    [n C - w + 1, n C + C), the only ones its queries can see, through one batched
    scaled_dot_product_attention call with an exact `[C, L]` band mask per block. Nothing is
    `[T, T]`: the largest tensors are the key/value blocks and the masks, O(T (C + w)).
    `segment` (`[T]` sequence ids of packed sequences) also masks keys of other sequences.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    groups, C = H // Hkv, block_size
    num_blocks = -(-T // C)
    L = C + window - 1
    pad_end = num_blocks * C - T

    # The query heads of one kv head share its key block: fold them into the rows (row
    # g C + r is query r of head kv * G + g), so keys are neither repeated nor broadcast.
    qb = F.pad(q, (0, 0, 0, 0, 0, pad_end)).view(B * num_blocks, C, Hkv, groups, D)
    qb = qb.permute(0, 2, 3, 1, 4).reshape(B * num_blocks, Hkv, groups * C, D)

    def key_blocks(x: torch.Tensor) -> torch.Tensor:
        # [B * num_blocks, Hkv, L, D]: overlapping windows, copied once.
        x = F.pad(x, (0, 0, 0, 0, window - 1, pad_end)).unfold(1, L, C)  # [B, n, Hkv, D, L]
        return x.permute(0, 1, 2, 4, 3).reshape(B * num_blocks, Hkv, L, D)

    # Row r of block n is query i = n C + r; column c is key j = n C - w + 1 + c.
    r = torch.arange(C, device=q.device)[:, None]
    c = torch.arange(L, device=q.device)[None, :]
    band = (c >= r) & (c < r + window)  # i - w < j <= i
    # Keys left of the sequence (padding) get segment -1, so no real query sees them; padded
    # queries past the end keep their own diagonal, so no row is empty (an empty row is NaN).
    if segment is None:
        segment = torch.zeros(T, dtype=torch.long, device=q.device)
    seg_q = F.pad(segment, (0, pad_end), value=-2).view(num_blocks, C)
    seg_k = F.pad(segment, (window - 1, 0), value=-1)
    seg_k = F.pad(seg_k, (0, pad_end), value=-2).unfold(0, L, C)
    mask = band & (seg_q[:, :, None] == seg_k[:, None, :])  # [num_blocks, C, L]
    mask = mask.repeat(B, groups, 1)[:, None]  # [B * num_blocks, 1, G * C, L]

    o = F.scaled_dot_product_attention(
        qb, key_blocks(k), key_blocks(v), attn_mask=mask, scale=scale
    )
    o = o.view(B * num_blocks, Hkv, groups, C, D).permute(0, 3, 1, 2, 4)
    return o.reshape(B, num_blocks * C, H, D)[:, :T]


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The CPU path: q `[B, T, H, D]`, k, v `[B, T, Hkv, D]` -> o `[B, T, H, D]` (q's dtype).

    Full attention (window None or >= T) runs scaled_dot_product_attention, one call per
    packed sequence (cu_seqlens is read on the host). Windowed attention runs blocked local
    attention with query blocks of `block_size` (default: `default_block_size`), all packed
    sequences in one batch.
    """
    dtype, out_dtype = _compute_dtype(q, k, v), q.dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    B, T, H, D = q.shape
    if window is not None and window < T:
        segment = None
        if cu_seqlens is not None:
            positions = torch.arange(T, device=q.device, dtype=cu_seqlens.dtype)
            segment = torch.searchsorted(cu_seqlens[1:], positions, right=True)
        if block_size is None:
            block_size = default_block_size(window, H, k.shape[2], D, T)
        o = _local_attention(q, k, v, window, scale, segment, block_size)
    elif cu_seqlens is None:
        o = _full_attention(q, k, v, causal, scale)
    else:
        offsets = cu_seqlens.tolist()
        pieces = [
            _full_attention(q[:, start:end], k[:, start:end], v[:, start:end], causal, scale)
            for start, end in zip(offsets[:-1], offsets[1:], strict=True)
        ]
        o = torch.cat(pieces, dim=1)
    return o.to(out_dtype)
