"""KV caches and the one-token decode step of softmax attention.

Both caches hold a batch of B sequences of different lengths, fill the same way (`prefill`
from a right-padded prompt, then `append` one token per sequence per step) and keep every
slot that holds no token at zero:
- `KVCache`: full attention; token t of sequence b sits at `k[b, t]`.
- `SlidingWindowCache`: a ring of the last `window` tokens; token t sits at `k[b, t % window]`.
Softmax attention does not care about the order of its keys, so in both caches the valid
slots of sequence b are simply the first `min(lengths[b], slots)`.
"""

from __future__ import annotations

import torch

from memzoo.kernels._core import InputCheck, register_op

__all__ = ["KVCache", "SlidingWindowCache", "attention_step"]


class _Cache:
    """Buffers k, v `[B, S, Hkv, D]` and `lengths` (int64 `[B]`, tokens seen per sequence)."""

    def __init__(
        self,
        batch_size: int,
        slots: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be an int >= 1, got {value!r}"
                )
        shape = (batch_size, slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.k.device)
        # Host copy of max(lengths): bounds the slots a step reads and finds a full cache
        # without a device sync per token.
        self.longest = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def _check_tokens(self, op: str, k: torch.Tensor, v: torch.Tensor, dims: str):
        check = InputCheck(op)
        for name, size in (("B", self.batch_size), ("Hkv", self.num_kv_heads)):
            check.sizes[name], check.origin[name] = size, "from the cache"
        check.sizes["D"], check.origin["D"] = self.head_dim, "from the cache"
        check.tensor("cache.k", self.k, "B S Hkv D")
        k = check.tensor("k", k, dims)
        v = check.tensor("v", v, dims)
        return check, k.to(self.k.dtype), v.to(self.v.dtype)

    def _prefill_lengths(self, check: InputCheck, lengths, T: int) -> list[int]:
        if lengths is None:
            return [T] * self.batch_size
        values = torch.as_tensor(lengths).tolist()
        if not isinstance(values, list) or len(values) != self.batch_size:
            raise check.error(f"lengths must hold B={self.batch_size} values, got {lengths!r}")
        if any(not isinstance(n, int) or not 0 <= n <= T for n in values):
            raise check.error(f"lengths must lie in [0, T={T}], got {values}")
        return values

    def valid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v `[B, S', Hkv, D]`, mask `[B, S']`): the slots a step attends over."""
        slots = min(self.longest, self.k.shape[1])
        mask = torch.arange(slots, device=self.k.device) < self.lengths[:, None]
        return self.k[:, :slots], self.v[:, :slots], mask


class KVCache(_Cache):
    """Full-attention KV cache for B sequences of up to `max_len` tokens each.

    k, v: `[B, max_len, Hkv, D]` in `dtype`; lengths: int64 `[B]`. Token t of sequence b is
    `k[b, t]`; slots at or past `lengths[b]` are zero.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"KVCache: max_len must be an int >= 1, got {max_len!r}")
        super().__init__(batch_size, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Replace the contents with a prompt: k, v `[B, T, Hkv, D]`, right-padded.

        lengths: `[B]` ints (list or tensor), the real tokens of each row (default: all T).
        """
        check, k, v = self._check_tokens("KVCache.prefill", k, v, "B T Hkv D")
        T = check.sizes["T"]
        values = self._prefill_lengths(check, lengths, T)
        if max(values) > self.max_len:
            raise check.error(
                f"a prompt of {max(values)} tokens does not fit a cache of max_len={self.max_len}"
            )
        self.lengths.copy_(torch.tensor(values))
        written = min(T, self.max_len)
        real = torch.arange(written, device=k.device) < self.lengths[:, None]  # [B, written]
        self.k.zero_()
        self.v.zero_()
        # where, not a product: padding may hold NaN, and NaN * 0 is NaN.
        self.k[:, :written] = torch.where(real[:, :, None, None], k[:, :written], 0)
        self.v[:, :written] = torch.where(real[:, :, None, None], v[:, :written], 0)
        self.longest = max(values)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write one token per sequence at its own position: k_new, v_new `[B, Hkv, D]`."""
        _, k_new, v_new = self._check_tokens("KVCache.append", k_new, v_new, "B Hkv D")
        if self.longest >= self.max_len:
            raise ValueError(
                f"KVCache.append: the cache is full: a sequence already holds max_len="
                f"{self.max_len} tokens; allocate a larger KVCache"
            )
        rows = torch.arange(self.batch_size, device=self.k.device)
        self.k[rows, self.lengths] = k_new
        self.v[rows, self.lengths] = v_new
        self.lengths += 1
        self.longest += 1


class SlidingWindowCache(_Cache):
    """Ring buffer of the last `window` keys and values of B sequences.

    k, v: `[B, window, Hkv, D]` in `dtype`; lengths: int64 `[B]`, all tokens seen (not capped).
    Token t of sequence b sits at slot `t % window` while it is among the last `window`;
    slots never written are zero. Never full.
    """

    def __init__(
        self,
        batch_size: int,
        window: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"SlidingWindowCache: window must be an int >= 1, got {window!r}")
        super().__init__(batch_size, window, num_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        """Replace the contents with the last `window` tokens of a right-padded prompt.

        k, v: `[B, T, Hkv, D]`; lengths: `[B]` ints, the real tokens of each row (default T).
        """
        check, k, v = self._check_tokens("SlidingWindowCache.prefill", k, v, "B T Hkv D")
        values = self._prefill_lengths(check, lengths, check.sizes["T"])
        self.lengths.copy_(torch.tensor(values))
        self.longest = max(values)
        if check.sizes["T"] == 0:
            self.k.zero_()
            self.v.zero_()
            return
        # Slot s holds the latest token t <= lengths[b] - 1 with t % window == s, if any.
        slots = torch.arange(self.window, device=k.device)
        last = self.lengths[:, None] - 1
        token = last - torch.remainder(last - slots, self.window)  # [B, window]
        held = token >= 0
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        keep, token = held[:, :, None, None], token.clamp(min=0)
        self.k.copy_(torch.where(keep, k[rows, token], 0))
        self.v.copy_(torch.where(keep, v[rows, token], 0))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write one token per sequence over its oldest: k_new, v_new `[B, Hkv, D]`."""
        _, k_new, v_new = self._check_tokens("SlidingWindowCache.append", k_new, v_new, "B Hkv D")
        rows = torch.arange(self.batch_size, device=self.k.device)
        slot = self.lengths % self.window
        self.k[rows, slot] = k_new
        self.v[rows, slot] = v_new
        self.lengths += 1
        self.longest += 1


@register_op("torch")
def attention_step(
    q: torch.Tensor,
    cache: KVCache | SlidingWindowCache,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step of `attention` (causal; windowed with a SlidingWindowCache).

    Appends k_new, v_new to `cache` IN PLACE, then attends from q over each sequence's cached
    tokens, the new one included: with a KVCache all `lengths[b]` of them, with a
    SlidingWindowCache the last min(lengths[b], window). Computes in fp32 (fp64 for fp64).

    Args:
        q: `[B, H, D]`, H a multiple of the cache's Hkv.
        cache: a KVCache or SlidingWindowCache with B sequences (e.g. after `prefill`).
        k_new, v_new: `[B, Hkv, D]`, the new token's key and value (cast to the cache dtype).
        scale: default D^-1/2.

    Returns:
        o `[B, H, D]` in q's dtype.

    Raises:
        TypeError for a cache of another type; ValueError naming the argument for shapes that
        do not match the cache, or a full KVCache.
    """
    if not isinstance(cache, _Cache):
        raise TypeError(
            "attention_step: cache must be a KVCache or SlidingWindowCache, "
            f"got {type(cache).__name__}"
        )
    check = InputCheck("attention_step")
    check.sizes["B"], check.origin["B"] = cache.batch_size, "from the cache"
    check.sizes["D"], check.origin["D"] = cache.head_dim, "from the cache"
    check.tensor("cache.k", cache.k, "B S Hkv D")
    q = check.tensor("q", q, "B H D")
    check.tensor("k_new", k_new, "B Hkv D")
    check.tensor("v_new", v_new, "B Hkv D")
    H, Hkv = check.sizes["H"], check.sizes["Hkv"]
    if H % Hkv:
        raise check.error(
            f"q's heads H={H} must be a multiple of the cache's kv heads Hkv={Hkv} "
            "(grouped-query attention)"
        )
    scale = cache.head_dim**-0.5 if scale is None else float(scale)

    cache.append(k_new, v_new)
    k, v, valid = cache.valid()
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    B, D, groups = cache.batch_size, cache.head_dim, H // Hkv
    qg = q.to(dtype).view(B, Hkv, groups, D)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k.to(dtype)) * scale
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bkgs,bskd->bkgd", scores.softmax(dim=-1), v.to(dtype))
    return o.reshape(B, H, D).to(q.dtype)
