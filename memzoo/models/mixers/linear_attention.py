"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv 2006.16236), with
the optional data-dependent decay of Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635).

Per head h, with feature map phi applied to q and k (`feature_dim` -> K' features), value head
dim V = d_model / num_heads, and log-decay g_t <= 0 (0 without decay):

    S_t = exp(g_t) S_{t-1} + phi(k_t)^T v_t        S: [K', V]
    z_t = exp(g_t) z_{t-1} + phi(k_t)              z: [K']   (only with normalize)
    o_t = phi(q_t) S_t / (phi(q_t) z_t + eps)      with normalize
    o_t = K'^-1/2 phi(q_t) S_t                     without

and y = out_proj(concat_h o_t). Defaults: 4 heads, feature_dim 16, phi(x) = elu(x) + 1,
normalised (eps = 1e-6), no decay, no short convolution; bias-free projections with nn.Linear's
default init, as in the BASED / JRT-RNN code.

- feature_map: "identity", "elu" (elu + 1), "relu", "taylor" (BASED's 1 + d + d^2 features) or
  "taylor_compressed" (its symmetric form); see `memzoo.kernels.linear_attn.feature_maps`.
  "identity" with normalize can divide by ~0: use it unnormalised.
- decay="gla": GLA's data-dependent gate reduced to one scalar per head,
  g_t = logsigmoid(W_g x_t + b_g) / 16 (GLA's gate_normalizer of 16 keeps early decays near 1).
- short_conv=True: a depthwise causal conv of width `conv_size` + SiLU on each of the q, k and v
  projections before the feature map, as flash-linear-attention's linear-attention layers do.

Shapes: x `[B, T, d_model]` -> y `[B, T, d_model]`. The attention runs in
`memzoo.kernels.linear_attn` (chunked; `linear_attn_step` for single-token decode).
Inference state per sequence (`state_size`): H K' V floats of S, + H K' of z when normalised,
+ (conv_size - 1)(2 H feature_dim + d_model) conv inputs with short_conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.kernels.linear_attn import FEATURE_MAPS, get_feature_map, linear_attn, linear_attn_step
from memzoo.models.conv import ShortConv
from memzoo.models.mixers.base import Mixer, check_mixer_input

__all__ = ["LinearAttention", "LinearAttentionCache"]

DECAYS = (None, "gla")
GATE_NORMALIZER = 16.0  # GLA's gate_normalizer: g = logsigmoid(.) / 16


@dataclass
class LinearAttentionCache:
    """Inference state of B sequences, replaced field by field as tokens arrive.

    state: S `[B, H, K', V]`, or (S, z `[B, H, K']`) when normalised; fp32 (fp64 for fp64 runs).
    conv: the q, k and v ShortConv states `[B, dim, conv_size - 1]`, or None without short_conv.
    """

    state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _check_int(who: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")


class LinearAttention(Mixer):
    """Multi-head (gated) linear attention; see the module docstring for the math."""

    name = "linear_attn"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        num_heads: int = 4,
        feature_dim: int = 16,
        feature_map: str = "elu",
        normalize: bool = True,
        decay: str | None = None,
        short_conv: bool = False,
        conv_size: int = 4,
    ):
        super().__init__(d_model, layer_idx)
        who = type(self).__name__
        _check_int(who, "num_heads", num_heads, 1)
        _check_int(who, "feature_dim", feature_dim, 1)
        if d_model % num_heads:
            raise ValueError(
                f"{who}: d_model={d_model} must be divisible by num_heads={num_heads} "
                "(the value head dim is d_model / num_heads)"
            )
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"{who}: feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}"
            )
        if decay not in DECAYS:
            raise ValueError(f"{who}: decay must be one of {DECAYS}, got {decay!r}")
        if short_conv:
            _check_int(who, "conv_size", conv_size, 2)
            if conv_size > 8:
                raise ValueError(f"{who}: conv_size must be in [2, 8], got {conv_size}")
        self.num_heads, self.feature_dim = num_heads, feature_dim
        self.head_dim = d_model // num_heads
        self.feature_map = get_feature_map(feature_map)
        self.num_features = self.feature_map.output_size(feature_dim)  # K'
        self.normalize, self.decay = bool(normalize), decay
        self.short_conv, self.conv_size = bool(short_conv), conv_size

        qk_dim = num_heads * feature_dim
        self.q_proj = nn.Linear(d_model, qk_dim, bias=False)
        self.k_proj = nn.Linear(d_model, qk_dim, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_proj = nn.Linear(d_model, num_heads) if decay == "gla" else None
        if self.short_conv:
            # fla's ShortConvolution: no bias, SiLU after the conv.
            self.q_conv, self.k_conv, self.v_conv = (
                ShortConv(dim, conv_size, bias=False, activation="silu")
                for dim in (qk_dim, qk_dim, d_model)
            )

    # ---------------------------------------------------------------------------------
    # Inference state
    # ---------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """Zero state for B sequences; max_seq_len is unused (the state does not grow)."""
        device = self.out_proj.weight.device if device is None else device
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        H, K, V = self.num_heads, self.num_features, self.head_dim
        S = torch.zeros(batch_size, H, K, V, device=device, dtype=state_dtype)
        state = (S, S.new_zeros(batch_size, H, K)) if self.normalize else S
        conv = None
        if self.short_conv:
            conv = tuple(c.init_state(batch_size, device) for c in self._convs())
        return LinearAttentionCache(state=state, conv=conv)

    def state_size(self, seq_len: int) -> int:
        """H K' V (+ H K' for z when normalised) + (conv_size - 1)(2 H feature_dim + d_model)."""
        H, K = self.num_heads, self.num_features
        size = H * K * self.head_dim + (H * K if self.normalize else 0)
        if self.short_conv:
            size += (self.conv_size - 1) * (2 * H * self.feature_dim + self.d_model)
        return size

    # ---------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        q, k, v, g = self._project(x, cache, cu_seqlens)
        o = self._attend(q, k, v, g, cache=cache, cu_seqlens=cu_seqlens)
        return self.out_proj(o.flatten(2))

    def _convs(self) -> tuple[ShortConv, ShortConv, ShortConv]:
        return self.q_conv, self.k_conv, self.v_conv

    def _project(self, x, cache, cu_seqlens):
        """Feature-mapped q, k `[B, T, H, K']`, v `[B, T, H, V]` and the log-decay g `[B, T, H]`
        (or None); advances the conv states of `cache`."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.short_conv:
            states = (None,) * 3 if cache is None else cache.conv
            convs = [
                conv(u, state=state, cu_seqlens=cu_seqlens)
                for conv, u, state in zip(self._convs(), (q, k, v), states, strict=True)
            ]
            (q, k, v), new_states = zip(*convs, strict=True)
            if cache is not None:
                cache.conv = new_states
        H = self.num_heads
        q = self.feature_map(q.view(B, T, H, self.feature_dim))
        k = self.feature_map(k.view(B, T, H, self.feature_dim))
        v = v.view(B, T, H, self.head_dim)
        g = None if self.g_proj is None else F.logsigmoid(self.g_proj(x)) / GATE_NORMALIZER
        return q, k, v, g

    def _attend(self, q, k, v, g, *, cache, cu_seqlens, initial_state=None) -> torch.Tensor:
        """o `[B, T, H, V]`: the full sequence from `initial_state`, or continuing `cache`."""
        if cache is None:
            o, _ = linear_attn(
                q, k, v, g=g, normalize=self.normalize, initial_state=initial_state,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
            return o
        if q.shape[1] == 1:
            o, cache.state = linear_attn_step(
                q[:, 0], k[:, 0], v[:, 0], cache.state,
                g=None if g is None else g[:, 0], normalize=self.normalize,
            )  # fmt: skip
            return o[:, None]
        o, cache.state = linear_attn(
            q, k, v, g=g, normalize=self.normalize, initial_state=cache.state,
            output_final_state=True,
        )  # fmt: skip
        return o
