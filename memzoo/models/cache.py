"""LMCache: the inference state of every sub-block of an LM, for B sequences decoded together."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LMCache", "LayerCache"]


@dataclass
class LayerCache:
    """One layer's state: one cache per mixer, per memory, and the FFN's (None if stateless)."""

    mixers: list = field(default_factory=list)
    memories: list = field(default_factory=list)
    ffn: object | None = None


@dataclass
class LMCache:
    """Per-layer caches plus bookkeeping.

    seen: tokens consumed so far by every row (rows advance together: prompts of one length).
    max_seq_len: the most tokens the caches were sized for (attention KV caches).
    """

    layers: list[LayerCache]
    max_seq_len: int
    seen: int = 0
