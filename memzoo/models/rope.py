"""Rotary position embeddings (RoPE, Su et al. 2021), GPT-NeoX "rotate half" layout."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "positions_for"]


def positions_for(
    batch: int,
    seq_len: int,
    *,
    offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Token positions, int64 `[T]`: offset + t, or (with cu_seqlens, int32 `[N + 1]`) the
    position of each packed token inside its own sequence, computed on the device."""
    t = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return t + offset
    starts = cu_seqlens.to(device=t.device, dtype=torch.long)
    seq = torch.searchsorted(starts[1:], t, right=True)
    return t - starts[seq]


class RotaryEmbedding(nn.Module):
    """Rotates the first `rotary_dim` channels of each head by position-dependent angles.

    `forward(x, positions)`: x `[B, T, H, D]`, positions int64 `[T]`; returns x rotated, in
    x's dtype (angles and products in fp32, fp64 for fp64 inputs).
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(
                f"RotaryEmbedding: rotary_dim must be even and in (0, head_dim={head_dim}], "
                f"got {rotary_dim}"
            )
        self.rotary_dim = rotary_dim
        self.base = base

    def inv_freq(self, device) -> torch.Tensor:
        """The R/2 rotation frequencies in fp64: recomputed per call, not a buffer, so casting
        the model to bf16 never rounds them."""
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device)
        return self.base ** (-steps / self.rotary_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = positions.to(torch.float64)[:, None] * self.inv_freq(x.device)  # [T, R/2]
        cos = angles.cos().to(compute)[:, None, :]
        sin = angles.sin().to(compute)[:, None, :]
        r = self.rotary_dim
        rot, rest = x[..., :r].to(compute), x[..., r:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([rotated.to(x.dtype), rest], dim=-1)
