"""RMSNorm, and the gated RMSNorm of Mamba-2. Both normalise in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedRMSNorm", "RMSNorm"]


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim; x `[..., dim]`, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: y = rmsnorm(x * silu(z)) * weight, per group of channels.

    x, z `[..., dim]`; the RMS is taken over groups of `dim // group_count` channels (one per
    SSD group, so the layer is invariant to how heads are split across devices).
    """

    def __init__(self, dim: int, group_count: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % group_count:
            raise ValueError(
                f"GatedRMSNorm: dim={dim} must be a multiple of group_count={group_count}"
            )
        self.eps = eps
        self.group_count = group_count
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        x = x.to(compute) * F.silu(z.to(compute))
        grouped = x.unflatten(-1, (self.group_count, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight).to(dtype)
