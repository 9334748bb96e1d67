"""JRT-RNN prefix linear attention (Arora et al. 2024, "Just read twice: closing the recall gap
for recurrent language models", arXiv 2407.05483).

The first M = `prefix_len` tokens of each sequence (the prefix) are read twice: once
non-causally through their own key/value projections k^e, v^e (the encoder), and once causally
like every other token. With phi the feature map, per head:

    S_enc = sum_{j<M} phi(k^e_j)^T v^e_j              z_enc = sum_{j<M} phi(k^e_j)
    S_t   = S_enc + sum_{s<=t} phi(k_s)^T v_s         z_t   = z_enc + sum_{s<=t} phi(k_s)
    o_t   = phi(q_t) S_t / (phi(q_t) z_t + eps),      y = out_proj(concat_h o_t)

so S_enc is linear attention's initial state (`memzoo.kernels.prefix_state`). An output inside
the prefix (t < M) sees the whole prefix, by design; changing tokens after a position t >= M - 1
never changes the outputs up to t.

Defaults follow PrefixLinearAttention of the JRT-RNN code (HazyResearch/prefix-linear-attention):
16 heads, feature_dim 16, the Taylor map phi(x) = [1, x / 2, vec(x x^T) / sqrt(32)] (so
phi(q)·phi(k) = 1 + q·k / 4 + (q·k)^2 / 32, BASED's kernel, 273 features), normalised,
bias-free projections; value head dim d_model / num_heads. prefix_len defaults to 64 (the paper's
models read M = 1024 of 2048-token contexts). The remaining options are those of `linear_attn`:
`decay="gla"` decays S_enc like any earlier state; `short_conv` convolves the causal q, k and v
only (the encoder reads its prefix non-causally anyway).

Packed sequences (cu_seqlens) each read their own first M tokens. Inference: the chunk that
starts a sequence holds its whole prefix region, min(M, chunk length), as in the reference code,
where the encoder reads min(M, prompt length) tokens. After a first chunk shorter than M, decoded
tokens are read causally (the prefix is the prompt); a multi-token chunk there would have to
widen a prefix whose outputs are already out, and raises ValueError.

Shapes: x `[B, T, d_model]` -> y `[B, T, d_model]`. Inference state per sequence
(`state_size`): H K' V floats of S (+ H K' of z when normalised), K' the feature size after
the map (273 for Taylor on 16 dims), + (conv_size - 1)(2 H feature_dim + d_model) with short_conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memzoo.kernels.linear_attn import prefix_state
from memzoo.models.mixers.base import check_mixer_input
from memzoo.models.mixers.linear_attention import LinearAttention, LinearAttentionCache
from memzoo.models.rope import positions_for

__all__ = ["JRTCache", "JRTLinearAttention"]


@dataclass
class JRTCache(LinearAttentionCache):
    """`LinearAttentionCache` plus `seen`, the tokens each sequence has consumed. After the
    first chunk `state` holds the encoder's S_enc (, z_enc) plus the causal sums."""

    seen: int = 0


class JRTLinearAttention(LinearAttention):
    """JRT-RNN prefix linear attention; see the module docstring for the math."""

    name = "jrt"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        prefix_len: int = 64,
        num_heads: int = 16,
        feature_dim: int = 16,
        feature_map: str = "taylor",
        normalize: bool = True,
        decay: str | None = None,
        short_conv: bool = False,
        conv_size: int = 4,
    ):
        super().__init__(
            d_model, layer_idx, num_heads=num_heads, feature_dim=feature_dim,
            feature_map=feature_map, normalize=normalize, decay=decay, short_conv=short_conv,
            conv_size=conv_size,
        )  # fmt: skip
        if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 1:
            raise ValueError(
                f"JRTLinearAttention: prefix_len must be an int >= 1, got {prefix_len!r}"
            )
        self.prefix_len = prefix_len
        self.k_enc_proj = nn.Linear(d_model, num_heads * feature_dim, bias=False)
        self.v_enc_proj = nn.Linear(d_model, d_model, bias=False)

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """Zero state for B sequences that have seen nothing yet (max_seq_len is unused)."""
        empty = super().init_cache(batch_size, device=device, dtype=dtype)
        return JRTCache(state=empty.state, conv=empty.conv)

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        T = x.shape[1]
        seen = 0 if cache is None else cache.seen
        if 0 < seen < self.prefix_len and T > 1:
            raise ValueError(
                f"JRTLinearAttention.forward: this chunk of {T} tokens starts at position {seen}, "
                f"inside the prefix region (prefix_len={self.prefix_len}) whose outputs the first "
                "chunk already produced; feed at least min(prefix_len, prompt length) tokens in "
                "the first chunk, or continue one token at a time"
            )
        q, k, v, g = self._project(x, cache, cu_seqlens)
        initial_state = None
        if seen == 0:
            initial_state = self._prefix_state(x, cu_seqlens)
            if cache is not None:  # a fresh cache: its zero state becomes the encoder's
                cache.state, initial_state = initial_state, None
        o = self._attend(
            q, k, v, g, cache=cache, cu_seqlens=cu_seqlens, initial_state=initial_state
        )
        if cache is not None:
            cache.seen += T
        return self.out_proj(o.flatten(2))

    def _prefix_state(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None):
        """S_enc `[N, H, K', V]` (and z_enc `[N, H, K']` when normalised) of each sequence's
        first min(M, length) tokens."""
        in_prefix = None
        if cu_seqlens is None:
            x = x[:, : self.prefix_len]
        else:
            positions = positions_for(1, x.shape[1], cu_seqlens=cu_seqlens, device=x.device)
            in_prefix = (positions < self.prefix_len).to(x.dtype)[None, :, None, None]
        B, L, _ = x.shape  # L = M, or all packed tokens with the ones past M masked
        H = self.num_heads
        k_enc = self.feature_map(self.k_enc_proj(x).view(B, L, H, self.feature_dim))
        if in_prefix is not None:
            # After the map: phi(0) is not 0 (Taylor's constant feature), so mask features.
            k_enc = k_enc * in_prefix
        v_enc = self.v_enc_proj(x).view(B, L, H, self.head_dim)
        return prefix_state(k_enc, v_enc, normalize=self.normalize, cu_seqlens=cu_seqlens)
