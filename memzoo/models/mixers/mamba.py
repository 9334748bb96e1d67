"""Mamba-1 block: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
2023, arXiv:2312.00752 (the `Mamba` module of mamba-ssm's mamba_simple.py).

Defaults: d_state N = 16, d_conv W = 4, expand 2 (d_inner = 2 d_model), dt_rank = ceil(d_model/16),
dt in [1e-3, 1e-1] at init (floor 1e-4), conv bias, no projection biases.

For x `[B, T, d_model]`:
    u, z = in_proj(x)                                         u, z: [B, T, d_inner]
    u = silu(depthwise causal conv_W(u))
    dt_low, B, C = x_proj(u)                                  [B, T, dt_rank], [B, T, N] x 2
    dt = softplus(dt_proj.weight @ dt_low + dt_proj.bias)     [B, T, d_inner]
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t                h: [B, d_inner, N], A = -exp(A_log)
    y_t = (C_t . h_t + D u_t) * silu(z_t)
    out = out_proj(y)                                         [B, T, d_model]
Every channel has its own decay per state (A is `[d_inner, N]`), so the scan runs in the
selective-scan kernel rather than the gated-linear-attention one.

Inference state per sequence: the conv's last W - 1 inputs `[d_inner, W - 1]` and the SSM state
`[d_inner, N]`, so `state_size = d_inner * (N + W - 1)` whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.kernels import selective_scan, selective_state_update
from memzoo.models.conv import ShortConv
from memzoo.models.mixers.base import Mixer, check_mixer_input, split_linear

__all__ = ["Mamba", "MambaCache"]


@dataclass
class MambaCache:
    """Inference state of a Mamba block for B sequences, replaced in place by each forward.

    conv_state: `[B, d_inner, d_conv - 1]`, the last inputs of the convolution, oldest first.
    ssm_state: `[B, d_inner, d_state]` fp32 (fp64 for an fp64 model).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state is kept in fp32 whatever the activations, or fp64 for fp64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Mamba: {name} must be an int >= 1, got {value!r}")


class Mamba(Mixer):
    """Mamba-1 block (selective SSM with a short conv and a SiLU gate); see the module docstring.

    Parameters: in_proj `[2 d_inner, d_model]`, conv1d (ShortConv, weight `[d_inner, d_conv]`),
    x_proj `[dt_rank + 2 N, d_inner]`, dt_proj (weight `[d_inner, dt_rank]`, bias `[d_inner]`),
    A_log `[d_inner, N]`, D `[d_inner]`, out_proj `[d_model, d_inner]`.
    """

    name = "mamba"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__(d_model, layer_idx)
        _check_positive_int("d_state", d_state)
        if not isinstance(d_conv, int) or not 2 <= d_conv <= 8:
            raise ValueError(f"Mamba: d_conv must be an int in [2, 8], got {d_conv!r}")
        d_inner = int(expand * d_model)
        if d_inner < 1:
            raise ValueError(
                f"Mamba: expand * d_model must be >= 1, got expand={expand!r} with "
                f"d_model={d_model}"
            )
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        elif isinstance(dt_rank, str):
            raise ValueError(f"Mamba: dt_rank must be 'auto' or an int >= 1, got {dt_rank!r}")
        _check_positive_int("dt_rank", dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(
                f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}"
            )
        if not dt_init_floor >= 0:
            raise ValueError(f"Mamba: dt_init_floor must be >= 0, got {dt_init_floor!r}")
        if not dt_scale > 0:
            raise ValueError(f"Mamba: dt_scale must be > 0, got {dt_scale!r}")

        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.d_inner, self.dt_rank = d_inner, dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = ShortConv(d_inner, d_conv, bias=conv_bias, activation="silu")
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)

        # dt_proj keeps the variance of dt_low at init.
        dt_init_std = dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        # The bias is softplus^-1 of dt ~ log-uniform in [dt_min, dt_max], so the initial time
        # steps span two decades. softplus^-1(y) = y + log(1 - exp(-y)), stable for small y.
        dt = torch.exp(
            torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # An LM-wide init that zeroes Linear biases must leave this one alone.
        self.dt_proj.bias._no_reinit = True

        # S4D-real init: A[d, n] = -(n + 1) for every channel.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, *, cache: MambaCache | None = None, cu_seqlens=None):
        """x `[B, T, d_model]` -> `[B, T, d_model]`; see the module docstring for the math.

        With a cache, multi-token chunks continue the scan from the cached state and a single
        token takes the decode path (conv update + selective_state_update).
        """
        check_mixer_input(self, x, cache, cu_seqlens)
        u, z = split_linear(x, self.in_proj, [self.d_inner, self.d_inner])
        u, conv_state = self.conv1d(
            u, state=None if cache is None else cache.conv_state, cu_seqlens=cu_seqlens
        )
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The bias goes in as delta_bias: the kernel adds it in fp32 right before the softplus.
        dt = F.linear(dt, self.dt_proj.weight)
        state_dtype = _state_dtype(self.A_log.dtype)
        A = -torch.exp(self.A_log.to(state_dtype))
        params = dict(
            D=self.D.to(state_dtype),
            delta_bias=self.dt_proj.bias.to(state_dtype),
            delta_softplus=True,
        )
        # B and C are shared by all channels: one group.
        B, C = B.unsqueeze(2), C.unsqueeze(2)
        if cache is not None and x.shape[1] == 1:
            y, ssm_state = selective_state_update(
                u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm_state, z=z[:, 0], **params
            )
            y = y.unsqueeze(1)
        else:
            y, ssm_state = selective_scan(
                u,
                dt,
                A,
                B,
                C,
                z=z,
                initial_state=None if cache is None else cache.ssm_state,
                output_final_state=cache is not None,
                cu_seqlens=cu_seqlens,
                **params,
            )
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, ssm_state
        return self.out_proj(y)

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len=None
    ) -> MambaCache:
        """Zero state for `batch_size` sequences (max_seq_len is unused: the state is fixed)."""
        device = self.A_log.device if device is None else device
        state_dtype = _state_dtype(self.A_log.dtype if dtype is None else dtype)
        return MambaCache(
            conv_state=torch.zeros(
                batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=state_dtype
            ),
            ssm_state=torch.zeros(
                batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype
            ),
        )

    def state_size(self, seq_len: int) -> int:
        """d_inner * (d_state + d_conv - 1): the SSM state plus the conv window, for any length."""
        return self.d_inner * (self.d_state + self.d_conv - 1)
