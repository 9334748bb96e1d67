"""BASED linear attention (Arora et al. 2024, "Simple linear attention language models balance
the recall-throughput tradeoff", arXiv 2402.18668).

Each head projects x to 16-dim q and k and reads them through the second-order Taylor expansion
of exp(q·k / 4), normalised:

    A_ts = phi(q_t)·phi(k_s) = 1 + q_t·k_s / 4 + (q_t·k_s)^2 / 32
    o_t  = sum_{s<=t} A_ts v_s / (sum_{s<=t} A_ts + eps)
    y    = out_proj(concat_h o_t)

with phi(x) = [1, x / 2, vec(x x^T) / sqrt(32)] (273 features). Since 1 + s + s^2/2 >= 1/2 the
normaliser is at least (t + 1) / 2, so eps (the kernel's 1e-6; the BASED code uses 1e-12) never
matters. Defaults as in the BASED code: 16 heads, feature dim 16 (fixed: the fused kernel builds
the 273 features on chip; `linear_attn` with feature_map="taylor" takes other dims), value head
dim d_model / num_heads, bias-free projections with nn.Linear's default init.

Shapes: x `[B, T, d_model]` -> y `[B, T, d_model]`; the attention is `memzoo.kernels.based_attn`
(`based_attn_step` for single-token decode). Inference state per sequence (`state_size`):
S `[H, 273, V]` and z `[H, 273]`, i.e. 273 (d_model + H) floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memzoo.kernels.linear_attn import based_attn, based_attn_step
from memzoo.kernels.linear_attn.based import FEATURE_DIM, NUM_FEATURES
from memzoo.models.mixers.base import Mixer, check_mixer_input

__all__ = ["Based", "BasedCache"]


@dataclass
class BasedCache:
    """Inference state of B sequences: S `[B, H, 273, V]` and z `[B, H, 273]`, fp32 (fp64 for
    fp64 runs); replaced as tokens arrive."""

    state: tuple[torch.Tensor, torch.Tensor]


class Based(Mixer):
    """BASED Taylor linear attention; see the module docstring for the math."""

    name = "based"

    def __init__(self, d_model: int, layer_idx: int = 0, *, num_heads: int = 16):
        super().__init__(d_model, layer_idx)
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"Based: num_heads must be an int >= 1, got {num_heads!r}")
        if d_model % num_heads:
            raise ValueError(
                f"Based: d_model={d_model} must be divisible by num_heads={num_heads} "
                "(the value head dim is d_model / num_heads)"
            )
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, num_heads * FEATURE_DIM, bias=False)
        self.k_proj = nn.Linear(d_model, num_heads * FEATURE_DIM, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """Zero state for B sequences; max_seq_len is unused (the state does not grow)."""
        device = self.out_proj.weight.device if device is None else device
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        shape = (batch_size, self.num_heads, NUM_FEATURES)
        S = torch.zeros(*shape, self.head_dim, device=device, dtype=state_dtype)
        return BasedCache(state=(S, S.new_zeros(shape)))

    def state_size(self, seq_len: int) -> int:
        """H * 273 * V for S plus H * 273 for z."""
        return self.num_heads * NUM_FEATURES * (self.head_dim + 1)

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, FEATURE_DIM)
        k = self.k_proj(x).view(B, T, H, FEATURE_DIM)
        v = self.v_proj(x).view(B, T, H, self.head_dim)
        if cache is None:
            o, _ = based_attn(q, k, v, cu_seqlens=cu_seqlens)
        elif T == 1:
            o, cache.state = based_attn_step(q[:, 0], k[:, 0], v[:, 0], cache.state)
            o = o[:, None]
        else:
            o, cache.state = based_attn(q, k, v, initial_state=cache.state, output_final_state=True)
        return self.out_proj(o.flatten(2))
