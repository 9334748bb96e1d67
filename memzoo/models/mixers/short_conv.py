"""Gated short convolution: the BaseConv layer that fills most layers of BASED (Arora et al. 2024,
"Simple linear attention language models balance the recall-throughput tradeoff",
arXiv 2402.18668).

Follows BaseConv of the BASED code (HazyResearch/based, based/models/mixers/base_conv.py):

    [u, gate] = in_proj(x)                      in_proj: d_model -> 2 d_inner, with bias
    y = out_proj(silu(conv(u)) * gate)          out_proj: d_inner -> d_model, with bias

where conv is a depthwise causal convolution of width `kernel_size` (3) without bias, as its
ShortConvolution builds it, and d_inner = expand * d_model (BaseConv's `expand_proj` is
2 * expand: its in_proj output holds both halves). Default expand 1; the BASED 360M recipes use
expand 2. Weights keep nn.Linear's / nn.Conv1d's default init, as in that code.

Shapes: x `[B, T, d_model]` -> y `[B, T, d_model]`; the convolution is
`memzoo.kernels.causal_conv1d` through `memzoo.models.conv.ShortConv`. Inference state per
sequence (`state_size`): the last kernel_size - 1 conv inputs, (kernel_size - 1) d_inner floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from memzoo.models.conv import ShortConv
from memzoo.models.mixers.base import Mixer, check_mixer_input, split_linear

__all__ = ["ShortConvCache", "ShortConvMixer"]


@dataclass
class ShortConvCache:
    """Inference state of B sequences: the conv inputs `[B, d_inner, kernel_size - 1]`, fp32
    (fp64 for fp64 runs); replaced as tokens arrive."""

    conv: torch.Tensor


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ShortConvMixer(Mixer):
    """BASED's gated short convolution; see the module docstring for the math."""

    name = "short_conv"

    def __init__(self, d_model: int, layer_idx: int = 0, *, kernel_size: int = 3, expand: int = 1):
        super().__init__(d_model, layer_idx)
        if not _is_int(kernel_size) or not 2 <= kernel_size <= 8:
            raise ValueError(
                f"ShortConvMixer: kernel_size must be an int in [2, 8], got {kernel_size!r}"
            )
        if not _is_int(expand) or expand < 1:
            raise ValueError(f"ShortConvMixer: expand must be an int >= 1, got {expand!r}")
        self.kernel_size, self.expand = kernel_size, expand
        self.d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner)
        self.conv = ShortConv(self.d_inner, kernel_size, bias=False, activation="silu")
        self.out_proj = nn.Linear(self.d_inner, d_model)

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """Zero conv state for B sequences; max_seq_len is unused (the state does not grow)."""
        device = self.out_proj.weight.device if device is None else device
        return ShortConvCache(conv=self.conv.init_state(batch_size, device))

    def state_size(self, seq_len: int) -> int:
        """(kernel_size - 1) * d_inner."""
        return (self.kernel_size - 1) * self.d_inner

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        u, gate = split_linear(x, self.in_proj, [self.d_inner, self.d_inner])
        if cache is None:
            u, _ = self.conv(u, cu_seqlens=cu_seqlens)
        else:
            u, cache.conv = self.conv(u, state=cache.conv)
        return self.out_proj(u * gate)
