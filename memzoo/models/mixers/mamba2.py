"""Mamba-2 block: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", 2024, arXiv:2405.21060 (the `Mamba2` module of
mamba-ssm's mamba2.py).

Defaults: d_state N = 128, d_conv W = 4, expand 2 (d_inner = 2 d_model), headdim P = 64
(H = d_inner / P heads), ngroups G = 1, A in -[1, 16] at init, dt in [1e-3, 1e-1] at init
(floor 1e-4), conv bias, no projection biases, gated RMSNorm before out_proj.

For x `[B, T, d_model]`:
    z, xBC, dt = in_proj(x)                      [B, T, d_inner], [B, T, conv_dim], [B, T, H]
    x, B, C = silu(depthwise causal conv_W(xBC))  x: [B, T, H, P]; B, C: [B, T, G, N]
    dt = softplus(dt + dt_bias)
    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T  h: [B, H, P, N]; A_h = -exp(A_log_h)
    y_t = h_t C_t + D_h x_t                       head h reads group h // (H / G)
    out = out_proj(rmsnorm(y * silu(z)))          rmsnorm per group of d_inner / G channels
where conv_dim = d_inner + 2 G N. One scalar decay per head makes the scan a gated linear
attention (SSD); it runs in `ssd`.

Inference state per sequence: the SSM state `[H, P, N]` and the conv's last W - 1 inputs
`[conv_dim, W - 1]`, so `state_size = H * P * N + conv_dim * (W - 1)` whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memzoo.kernels import ssd, ssd_step
from memzoo.models.conv import ShortConv
from memzoo.models.mixers.base import Mixer, check_mixer_input, split_linear
from memzoo.models.norm import GatedRMSNorm

__all__ = ["Mamba2", "Mamba2Cache"]


@dataclass
class Mamba2Cache:
    """Inference state of a Mamba-2 block for B sequences, replaced in place by each forward.

    conv_state: `[B, conv_dim, d_conv - 1]`, the last inputs of the convolution, oldest first.
    ssm_state: `[B, H, headdim, d_state]` fp32 (fp64 for an fp64 model), mamba-ssm's layout.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state is kept in fp32 whatever the activations, or fp64 for fp64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Mamba2: {name} must be an int >= 1, got {value!r}")


class Mamba2(Mixer):
    """Mamba-2 block (SSD with a short conv and a gated RMSNorm); see the module docstring.

    Parameters: in_proj `[2 d_inner + 2 G N + H, d_model]`, conv1d (ShortConv, weight
    `[conv_dim, d_conv]`), dt_bias, A_log, D `[H]`, norm.weight `[d_inner]`,
    out_proj `[d_model, d_inner]`.
    """

    name = "mamba2"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__(d_model, layer_idx)
        for name, value in (("d_state", d_state), ("expand", expand), ("headdim", headdim)):
            _check_positive_int(name, value)
        _check_positive_int("ngroups", ngroups)
        if not isinstance(d_conv, int) or not 2 <= d_conv <= 8:
            raise ValueError(f"Mamba2: d_conv must be an int in [2, 8], got {d_conv!r}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(
                f"Mamba2: d_inner = expand * d_model = {d_inner} must be a multiple of "
                f"headdim={headdim}"
            )
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(
                f"Mamba2: the number of heads d_inner / headdim = {nheads} must be a multiple "
                f"of ngroups={ngroups}"
            )
        if len(A_init_range) != 2 or not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(
                f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got "
                f"{A_init_range!r}"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(
                f"Mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}"
            )
        if not dt_init_floor >= 0:
            raise ValueError(f"Mamba2: dt_init_floor must be >= 0, got {dt_init_floor!r}")

        self.d_state, self.d_conv, self.expand = d_state, d_conv, expand
        self.d_inner, self.headdim, self.nheads, self.ngroups = d_inner, headdim, nheads, ngroups
        self.conv_dim = d_inner + 2 * ngroups * d_state

        # Output order [z, xBC, dt], as in mamba-ssm, so its checkpoints load unchanged.
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=bias)
        self.conv1d = ShortConv(self.conv_dim, d_conv, bias=conv_bias, activation="silu")

        # dt_bias = softplus^-1 of dt ~ log-uniform in [dt_min, dt_max], one per head.
        # softplus^-1(y) = y + log(1 - exp(-y)), stable for small y.
        dt = torch.exp(
            torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True

        # One decay rate per head, A_h = -uniform(A_init_range): heads with a range of memories.
        A = torch.empty(nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(nheads))
        self.D._no_weight_decay = True

        # Normalising per group keeps the layer independent of how heads are sharded.
        self.norm = GatedRMSNorm(d_inner, group_count=ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, *, cache: Mamba2Cache | None = None, cu_seqlens=None):
        """x `[B, T, d_model]` -> `[B, T, d_model]`; see the module docstring for the math.

        With a cache, multi-token chunks continue the scan from the cached state and a single
        token takes the decode path (conv update + ssd_step).
        """
        check_mixer_input(self, x, cache, cu_seqlens)
        z, xBC, dt = split_linear(x, self.in_proj, [self.d_inner, self.conv_dim, self.nheads])
        xBC, conv_state = self.conv1d(
            xBC, state=None if cache is None else cache.conv_state, cu_seqlens=cu_seqlens
        )
        G, N = self.ngroups, self.d_state
        xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (self.nheads, self.headdim))
        B, C = B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        state_dtype = _state_dtype(self.A_log.dtype)
        params = dict(
            D=self.D.to(state_dtype), dt_bias=self.dt_bias.to(state_dtype), dt_softplus=True
        )
        A = -torch.exp(self.A_log.to(state_dtype))
        # The gate z goes through the norm (norm_before_gate=False), not into the scan.
        if cache is not None and x.shape[1] == 1:
            y, ssm_state = ssd_step(
                xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm_state, **params
            )
            y = y.unsqueeze(1)
        else:
            y, ssm_state = ssd(
                xs,
                dt,
                A,
                B,
                C,
                initial_state=None if cache is None else cache.ssm_state,
                output_final_state=cache is not None,
                cu_seqlens=cu_seqlens,
                **params,
            )
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, ssm_state
        return self.out_proj(self.norm(y.flatten(-2), z))

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len=None
    ) -> Mamba2Cache:
        """Zero state for `batch_size` sequences (max_seq_len is unused: the state is fixed)."""
        device = self.A_log.device if device is None else device
        state_dtype = _state_dtype(self.A_log.dtype if dtype is None else dtype)
        return Mamba2Cache(
            conv_state=torch.zeros(
                batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=state_dtype
            ),
            ssm_state=torch.zeros(
                batch_size,
                self.nheads,
                self.headdim,
                self.d_state,
                device=device,
                dtype=state_dtype,
            ),
        )

    def state_size(self, seq_len: int) -> int:
        """H * P * N + conv_dim * (d_conv - 1): SSM state plus conv window, for any length."""
        return self.nheads * self.headdim * self.d_state + self.conv_dim * (self.d_conv - 1)
