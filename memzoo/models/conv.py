"""ShortConv: the depthwise causal convolution that mixers put in front of their scans."""

from __future__ import annotations

import math

import torch
from torch import nn

from memzoo.kernels import causal_conv1d, causal_conv1d_update

__all__ = ["ShortConv"]


class ShortConv(nn.Module):
    """Depthwise causal conv over time (optionally + SiLU): x `[B, T, dim]` -> `[B, T, dim]`.

    weight `[dim, kernel_size]` (nn.Conv1d's `[dim, 1, W]` squeezed) with nn.Conv1d's default
    init. Its inference state is the last `kernel_size - 1` inputs, `[B, dim, W - 1]` fp32.
    """

    def __init__(
        self, dim: int, kernel_size: int = 4, *, bias: bool = True, activation: str | None = "silu"
    ):
        super().__init__()
        if not 2 <= kernel_size <= 8:
            raise ValueError(f"ShortConv: kernel_size must be in [2, 8], got {kernel_size}")
        self.dim, self.kernel_size, self.activation = dim, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        bound = 1 / math.sqrt(kernel_size)  # nn.Conv1d: kaiming_uniform(a=sqrt(5)), fan_in = W
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Zero state `[B, dim, W - 1]` (fp32 by default): no inputs seen yet."""
        return torch.zeros(batch_size, self.dim, self.kernel_size - 1, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[B, T, dim]`; state `[B, dim, W - 1]` or None (start of the sequences).

        Returns y `[B, T, dim]` and, when a state was given, the state after these T tokens.
        """
        if state is None:
            y, _ = causal_conv1d(
                x, self.weight, self.bias, activation=self.activation, cu_seqlens=cu_seqlens
            )
            return y, None
        if x.shape[1] == 1:
            y, state = causal_conv1d_update(
                x[:, 0], state, self.weight, self.bias, activation=self.activation
            )
            return y[:, None], state
        return causal_conv1d(
            x,
            self.weight,
            self.bias,
            activation=self.activation,
            initial_state=state,
            output_final_state=True,
        )
