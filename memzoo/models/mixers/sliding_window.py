"""Causal sliding-window attention with rotary positions, grouped-query heads and a ring cache.

Sliding-window attention as in Longformer (Beltagy et al. 2020, arXiv:2004.05150), with the
rolling-buffer KV cache of Mistral 7B (Jiang et al. 2023, arXiv:2310.06825); RoPE and GQA as
in `Attention` (attention.py), whose projections this layer shares.

Defaults: window = 512, and those of `Attention`: num_heads = max(1, d_model // 64),
num_kv_heads = num_heads, head_dim = d_model // num_heads, rope_base = 10000, no biases.

For x `[B, T, d_model]`, the layer is `Attention` with each query seeing only the `window`
latest tokens, itself included:

    o_i = sum_{i - window < j <= i} softmax_j(q_i . k_j / sqrt(D)) v_j

so the inference state is a ring of the last `window` keys and values
(`memzoo.kernels.SlidingWindowCache`, token t at slot t % window): 2 Hkv D min(t, window)
floats, bounded however long the sequence grows.
"""

from __future__ import annotations

import torch

from memzoo.kernels import SlidingWindowCache
from memzoo.models.mixers.attention import Attention

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(Attention):
    """Causal sliding-window attention with RoPE and grouped-query heads (`name = "swa"`).

    Parameters as in `Attention`. Cache: `init_cache(B)` gives a `SlidingWindowCache` (no
    max_seq_len needed: it is never full); all B rows hold the same number of tokens.
    """

    name = "swa"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        window: int = 512,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        bias: bool = False,
    ):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(
                f"{type(self).__name__}: window must be an int >= 1 (the tokens a query sees, "
                f"itself included), got {window!r}"
            )
        super().__init__(
            d_model,
            layer_idx,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rope_base=rope_base,
            bias=bias,
        )
        self.window = window

    def _check_cache(self, cache) -> None:
        who = f"{type(self).__name__}.forward"
        if not isinstance(cache, SlidingWindowCache):
            raise TypeError(
                f"{who}: cache must be the SlidingWindowCache from init_cache, got "
                f"{type(cache).__name__}"
            )
        if cache.window != self.window:
            raise ValueError(
                f"{who}: the cache holds a window of {cache.window} tokens, the layer's window "
                f"is {self.window}"
            )

    def _cached_tokens(self, cache: SlidingWindowCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the last min(L, window) tokens, in time order."""
        L = cache.longest
        slots = torch.arange(L - min(L, self.window), L, device=cache.k.device) % self.window
        return cache.k[:, slots], cache.v[:, slots]

    def _write_chunk(self, cache: SlidingWindowCache, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a chunk k, v `[B, T, Hkv, D]` after the L cached tokens into the ring.

        Token L + t goes to slot (L + t) % window; only the chunk's last min(T, window)
        tokens survive, so only they are written (their slots are distinct).
        """
        L, T = cache.longest, k.shape[1]
        kept = min(T, self.window)
        slots = torch.arange(L + T - kept, L + T, device=cache.k.device) % self.window
        cache.k[:, slots] = k[:, T - kept :].to(cache.k.dtype)
        cache.v[:, slots] = v[:, T - kept :].to(cache.v.dtype)
        cache.lengths += T
        cache.longest += T

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len: int | None = None
    ) -> SlidingWindowCache:
        """An empty ring of `window` tokens for each of `batch_size` sequences (max_seq_len is
        accepted for the common interface and not needed)."""
        return SlidingWindowCache(
            batch_size,
            self.window,
            self.num_kv_heads,
            self.head_dim,
            **self._cache_placement(device, dtype),
        )

    def state_size(self, seq_len: int) -> int:
        """Keys and values of the last `window` tokens: 2 Hkv D min(seq_len, window)."""
        return 2 * self.num_kv_heads * self.head_dim * min(seq_len, self.window)
