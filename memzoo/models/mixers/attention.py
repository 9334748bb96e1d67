"""Causal multi-head softmax attention with rotary positions and grouped-query heads.

Vaswani et al. 2017, "Attention Is All You Need" (arXiv:1706.03762), with rotary position
embeddings (RoPE, Su et al. 2021, arXiv:2104.09864) and grouped-query attention (GQA,
Ainslie et al. 2023, arXiv:2305.13245).

Defaults: num_heads = max(1, d_model // 64), num_kv_heads = num_heads (plain multi-head
attention), head_dim = d_model // num_heads, rope_base = 10000, no biases.

For x `[B, T, d_model]`, with H query heads, Hkv kv heads and head dim D:

    q, k, v = x W_qkv                           q: [B, T, H, D]; k, v: [B, T, Hkv, D]
    q, k    = RoPE(q, t), RoPE(k, t)            t: the token's position in its sequence
    o_i     = sum_{j <= i} softmax_j(q_i . k_j / sqrt(D)) v_j   (query head h reads kv head
                                                                 h // (H / Hkv))
    y       = o W_out                           [B, T, d_model]

The inference state is a preallocated KV cache (`memzoo.kernels.KVCache`) of 2 Hkv D floats
per token. `SlidingWindowAttention` (sliding_window.py) is this layer with a window.
"""

from __future__ import annotations

import torch
from torch import nn

from memzoo.kernels import KVCache, SlidingWindowCache, attention, attention_step
from memzoo.models.mixers.base import Mixer, check_mixer_input
from memzoo.models.rope import RotaryEmbedding, positions_for

__all__ = ["Attention"]


def _check_count(layer: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{layer}: {name} must be an int >= 1, got {value!r}")


def _attend_after_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Causal attention of a chunk of T new tokens over n cached ones and themselves.

    q `[B, T, H, D]`; k, v `[B, T, Hkv, D]` the chunk's own keys and values; k_past, v_past
    `[B, n, Hkv, D]` the cached tokens just before the chunk, in time order. New token r
    (absolute index n + r among the n + T keys) sees key c when c <= n + r and, with a
    window, c > n + r - window: the causal mask aligned to the bottom right of the
    `[T, n + T]` score matrix. Explicit scores `[B, H, T, n + T]` in fp32 (fp64 for fp64);
    returns o `[B, T, H, D]` in q's dtype.
    """
    B, T, H, D = q.shape
    n, Hkv = k_past.shape[1], k.shape[2]
    dtype = torch.float64 if torch.float64 in (q.dtype, k_past.dtype) else torch.float32
    keys = torch.cat([k_past.to(dtype), k.to(dtype)], dim=1)
    values = torch.cat([v_past.to(dtype), v.to(dtype)], dim=1)
    query = torch.arange(T, device=q.device)[:, None] + n
    key = torch.arange(n + T, device=q.device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    # The query heads of one kv head share its keys: group them instead of repeating keys.
    qg = q.to(dtype).view(B, T, Hkv, H // Hkv, D)
    scores = torch.einsum("btkgd,bskd->bkgts", qg, keys) * D**-0.5
    scores.masked_fill_(~allowed, float("-inf"))
    o = torch.einsum("bkgts,bskd->btkgd", scores.softmax(dim=-1), values)
    return o.reshape(B, T, H, D).to(q.dtype)


class Attention(Mixer):
    """Causal multi-head attention with RoPE and grouped-query heads (`name = "attn"`).

    Parameters: `qkv` (one Linear d_model -> (H + 2 Hkv) D, rows in the order q, k, v) and
    `out_proj` (H D -> d_model), both with nn.Linear's default init, as mamba-ssm's MHA
    module does (the paper leaves it open).

    Cache: `init_cache(B, max_seq_len=N)` gives a `KVCache` of N tokens per sequence.
    `forward(x, cache=cache)` continues from the tokens already cached; all B rows of a
    cache hold the same number of tokens, as they do when every call feeds all rows.
    """

    name = "attn"
    # How many of the latest tokens a query sees, itself included; None: all of them.
    # SlidingWindowAttention sets it.
    window: int | None = None

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        bias: bool = False,
    ):
        super().__init__(d_model, layer_idx)
        layer = type(self).__name__
        num_heads = max(1, d_model // 64) if num_heads is None else num_heads
        _check_count(layer, "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_count(layer, "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{layer}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
                "(each kv head serves a group of query heads)"
            )
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"{layer}: d_model={d_model} is not divisible by num_heads={num_heads}; "
                    "pass head_dim explicitly"
                )
            head_dim = d_model // num_heads
        _check_count(layer, "head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(
                f"{layer}: head_dim must be even (RoPE rotates pairs of channels), got {head_dim}"
            )
        if not rope_base > 0:
            raise ValueError(f"{layer}: rope_base must be > 0, got {rope_base!r}")

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv = nn.Linear(d_model, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, base=rope_base)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: KVCache | SlidingWindowCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x `[B, T, d_model]` -> `[B, T, d_model]`.

        cache: from `init_cache`, updated in place; T == 1 is one decode step, T > 1 a
        prompt or a further prompt chunk. cu_seqlens: int32 `[N + 1]` packed sequences
        (B == 1), each starting again at position 0.
        """
        check_mixer_input(self, x, cache, cu_seqlens)
        if cache is not None:
            self._check_cache(cache)
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim

        offset = 0 if cache is None else cache.longest
        positions = positions_for(B, T, offset=offset, cu_seqlens=cu_seqlens, device=x.device)
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = self.rotary(q.view(B, T, H, D), positions)
        k = self.rotary(k.view(B, T, Hkv, D), positions)
        v = v.view(B, T, Hkv, D)

        if cache is None:
            o = attention(q, k, v, causal=True, window=self.window, cu_seqlens=cu_seqlens)
        elif T == 1:
            o = attention_step(q[:, 0], cache, k[:, 0], v[:, 0])[:, None]
        elif cache.longest == 0:
            o = attention(q, k, v, causal=True, window=self.window)
            cache.prefill(k, v)
        else:
            k_past, v_past = self._cached_tokens(cache)
            o = _attend_after_cache(q, k, v, k_past, v_past, self.window)
            self._write_chunk(cache, k, v)
        return self.out_proj(o.reshape(B, T, H * D))

    def _check_cache(self, cache) -> None:
        who = f"{type(self).__name__}.forward"
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"{who}: cache must be the KVCache from init_cache, got {type(cache).__name__}"
            )

    def _cached_tokens(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of every cached token, `[B, L, Hkv, D]` in time order."""
        return cache.k[:, : cache.longest], cache.v[:, : cache.longest]

    def _write_chunk(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a chunk k, v `[B, T, Hkv, D]` after the L cached tokens (slots L..L+T-1)."""
        L, T = cache.longest, k.shape[1]
        if L + T > cache.max_len:
            raise ValueError(
                f"{type(self).__name__}.forward: {T} more tokens do not fit the KV cache: it "
                f"holds {L} of max_seq_len={cache.max_len}; allocate it with a larger "
                "max_seq_len"
            )
        cache.k[:, L : L + T] = k
        cache.v[:, L : L + T] = v
        cache.lengths += T
        cache.longest += T

    def _cache_placement(self, device, dtype) -> dict:
        """device and dtype of a new cache: those asked for, else the parameters'."""
        weight = self.qkv.weight
        return {
            "device": weight.device if device is None else device,
            "dtype": weight.dtype if dtype is None else dtype,
        }

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len: int | None = None
    ) -> KVCache:
        """An empty KVCache of `max_seq_len` tokens for each of `batch_size` sequences."""
        if max_seq_len is None:
            raise ValueError(
                f"{type(self).__name__}.init_cache: max_seq_len is required: the KV cache is "
                "preallocated for max_seq_len tokens per sequence"
            )
        return KVCache(
            batch_size,
            max_seq_len,
            self.num_kv_heads,
            self.head_dim,
            **self._cache_placement(device, dtype),
        )

    def state_size(self, seq_len: int) -> int:
        """Keys and values of every token: 2 Hkv D seq_len."""
        return 2 * self.num_kv_heads * self.head_dim * seq_len
