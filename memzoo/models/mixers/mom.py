"""Mixture-of-Memories: Du, Sun, Lan, Hu & Cheng, "MoM: Linear Sequence Modeling with
Mixture-of-Memories", 2025, arXiv:2502.13685 (the gated-linear-attention memories of the
reference code's MomGatedLinearAttention).

A router sends every token to k of M independent memories, each a gated linear attention over
only the tokens routed to it; an optional shared memory sees every token. More memories hold
more associations with less interference, at the same cost per token.

Defaults: M = 4 memories, top-2 routing, a shared memory, 4 heads, key width d/2 and value
width d over the heads (expand_k 0.5, expand_v 1; dk = d / (2H), dv = d / H), short convs of
width 4, decay normaliser 16, RMSNorm eps 1e-5; projections initialised xavier-uniform with
gain 2^-2.5 and zero biases, as in the reference code. For x `[B, T, d_model]`:

    p_t = softmax(router(x_t)); w_t, m_t = top-k of p_t, renormalised       [M]; [k], [k]
    q_t = silu(conv(x W_q))                           [H, dk]  shared by the memories
    k^m_t = silu(conv(x W_k^m)),  v^m_t = silu(conv(x W_v^m))                [H, dk], [H, dv]
    g^m_t = logsigmoid(x W_g^m + b_g^m) / 16          [H]      per-head log-decay
    S^m_t = exp(g^m_t) S^m_{t-1} + k^m_t^T v^m_t      if m in m_t (always for the shared one)
    o_t = dk^-1/2 q_t (sum_j w_tj S^{m_tj}_t + S^shared_t)                   [H, dv]
    y_t = out_proj(rmsnorm_per_head(o_t) * silu(x W_gate))

W_k, W_v, W_g are stacked over the memories (`[M (+ 1), d, H dk]`, ...) and applied in one
einsum. The short convs run along the token stream, before routing, on q and on every memory's
k and v (the reference code instead convolves each memory's routed subsequence); then a
token's conv inputs do not depend on where earlier tokens were routed. All memories run in
`memzoo.kernels.mom.memory_attn`: on CUDA one varlen gated linear attention over the B*T*k
token copies grouped by (sequence, memory); on CPU every memory over every token, masked, which
needs no grouping and compiles with `torch.compile(fullgraph=True)`. Nothing reads the routing
back to the host.

`aux_loss` (set by every forward): Switch-style load balancing over the tokens of the call,
M * sum_m f_m P_m, with f_m the fraction of the B*T*k picks that went to memory m and P_m its
mean router probability; 1 when balanced. The trainer adds it times `aux_loss_coef`.

Decode: one state per memory `[B, M (+ 1), H, dk, dv]`; a token updates only the memories it is
routed to (and the shared one). `state_size` = (M + shared) H dk dv + (conv_size - 1)
(H dk + (M + shared) H (dk + dv)) floats per sequence, whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.kernels.mom import memory_attn, memory_attn_step, route
from memzoo.models.conv import ShortConv
from memzoo.models.mixers.base import Mixer, check_mixer_input
from memzoo.models.norm import RMSNorm

__all__ = ["MixtureOfMemories", "MixtureOfMemoriesCache"]

INIT_GAIN = 2**-2.5  # the reference code's xavier-uniform gain for every projection


@dataclass
class MixtureOfMemoriesCache:
    """Inference state of B sequences, replaced field by field as tokens arrive.

    state: `[B, M (+ 1), H, dk, dv]` every memory's state (the shared one last), fp32 (fp64 for
        fp64 runs).
    conv: the q, k and v ShortConv states `[B, channels, conv_size - 1]` (k and v: every memory).
    """

    state: torch.Tensor
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"MixtureOfMemories: {name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"MixtureOfMemories: {name} must be at most {high}, got {value}")


def _head_dim(d_model: int, expand: float, num_heads: int, name: str) -> int:
    """d_model * expand split over the heads; an error unless that is a whole positive size."""
    numeric = isinstance(expand, int | float) and not isinstance(expand, bool)
    width = d_model * expand if numeric else 0
    if not numeric or expand <= 0 or width != int(width):
        raise ValueError(
            f"MixtureOfMemories: {name} must be a positive number with d_model * {name} whole, "
            f"got {expand!r} (d_model={d_model})"
        )
    if int(width) % num_heads:
        raise ValueError(
            f"MixtureOfMemories: d_model * {name} = {int(width)} must be divisible by "
            f"num_heads={num_heads}"
        )
    return int(width) // num_heads


def _stacked_projection(memories: int, d_in: int, d_out: int) -> nn.Parameter:
    """`[memories, d_in, d_out]`, each memory's matrix xavier-uniform with the reference gain."""
    bound = INIT_GAIN * math.sqrt(6.0 / (d_in + d_out))
    return nn.Parameter(torch.empty(memories, d_in, d_out).uniform_(-bound, bound))


class MixtureOfMemories(Mixer):
    """Mixture-of-Memories gated linear attention; see the module docstring for the math."""

    name = "mom"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        num_memories: int = 4,
        topk: int = 2,
        shared_memory: bool = True,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        conv_size: int = 4,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
    ):
        super().__init__(d_model, layer_idx)
        _check_int("num_memories", num_memories, 1)
        _check_int("topk", topk, 1, num_memories)
        _check_int("num_heads", num_heads, 1)
        _check_int("conv_size", conv_size, 2, 8)
        if not isinstance(shared_memory, bool):
            raise ValueError(
                f"MixtureOfMemories: shared_memory must be a bool, got {shared_memory!r}"
            )
        if not gate_logit_normalizer > 0:
            raise ValueError(
                "MixtureOfMemories: gate_logit_normalizer must be > 0, "
                f"got {gate_logit_normalizer!r}"
            )
        if not norm_eps > 0:
            raise ValueError(f"MixtureOfMemories: norm_eps must be > 0, got {norm_eps!r}")
        self.num_memories, self.topk, self.shared_memory = num_memories, topk, shared_memory
        self.num_heads, self.conv_size = num_heads, conv_size
        self.key_dim = _head_dim(d_model, expand_k, num_heads, "expand_k")
        self.value_dim = _head_dim(d_model, expand_v, num_heads, "expand_v")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        H, dk, dv = num_heads, self.key_dim, self.value_dim
        memories = self.memories  # the shared memory is the last one

        self.router = nn.Linear(d_model, num_memories, bias=False)
        self.q_proj = nn.Linear(d_model, H * dk, bias=False)
        self.k_weight = _stacked_projection(memories, d_model, H * dk)
        self.v_weight = _stacked_projection(memories, d_model, H * dv)
        self.g_weight = _stacked_projection(memories, d_model, H)
        self.g_bias = nn.Parameter(torch.zeros(memories, H))
        self.gate_proj = nn.Linear(d_model, H * dv, bias=False)
        self.out_proj = nn.Linear(H * dv, d_model, bias=False)
        for linear in (self.router, self.q_proj, self.gate_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight, gain=INIT_GAIN)
        # fla's ShortConvolution, as the reference code uses it: no bias, SiLU after the conv.
        self.q_conv, self.k_conv, self.v_conv = (
            ShortConv(dim, conv_size, bias=False, activation="silu")
            for dim in (H * dk, memories * H * dk, memories * H * dv)
        )
        self.norm = RMSNorm(dv, eps=norm_eps)

    @property
    def memories(self) -> int:
        """Memories holding a state: the routed ones, plus the shared one."""
        return self.num_memories + self.shared_memory

    # ---------------------------------------------------------------------------------
    # Inference state
    # ---------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """Zero state for B sequences; max_seq_len is unused (the state does not grow)."""
        device = self.out_proj.weight.device if device is None else device
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(
            batch_size, self.memories, self.num_heads, self.key_dim, self.value_dim,
            device=device, dtype=state_dtype,
        )  # fmt: skip
        conv = tuple(c.init_state(batch_size, device) for c in self._convs())
        return MixtureOfMemoriesCache(state=state, conv=conv)

    def state_size(self, seq_len: int) -> int:
        """(M + shared) H dk dv + (conv_size - 1)(H dk + (M + shared) H (dk + dv))."""
        H, dk, dv, memories = self.num_heads, self.key_dim, self.value_dim, self.memories
        conv = (self.conv_size - 1) * (H * dk + memories * H * (dk + dv))
        return memories * H * dk * dv + conv

    # ---------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        B, T, _ = x.shape
        logits = self.router(x)
        weights, indices = route(logits, self.topk)
        self.aux_loss = self.load_balancing_loss(logits, indices)
        if self.shared_memory:
            # The shared memory is picked by every token, with weight 1.
            indices = torch.cat([indices, indices.new_full((B, T, 1), self.num_memories)], -1)
            weights = torch.cat([weights, weights.new_ones(B, T, 1)], -1)

        q, k, v, g = self._project(x, cache, cu_seqlens)
        if cache is None:
            o, _ = memory_attn(q, k, v, g, weights, indices, cu_seqlens=cu_seqlens)
        elif T == 1:
            o, cache.state = memory_attn_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], weights[:, 0], indices[:, 0], cache.state
            )
            o = o[:, None]
        else:
            o, cache.state = memory_attn(
                q, k, v, g, weights, indices, initial_state=cache.state, output_final_state=True
            )
        gate = F.silu(self.gate_proj(x)).view(B, T, self.num_heads, self.value_dim)
        return self.out_proj((self.norm(o) * gate).flatten(2))

    def load_balancing_loss(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """M * sum_m f_m P_m over the tokens of logits `[B, T, M]` and their picks `[B, T, k]`."""
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = logits.to(compute).softmax(-1)
        picked = torch.zeros_like(probs).scatter_(-1, indices, 1.0)
        fraction = picked.mean((0, 1)) / self.topk
        return self.num_memories * (fraction * probs.mean((0, 1))).sum()

    def _convs(self) -> tuple[ShortConv, ShortConv, ShortConv]:
        return self.q_conv, self.k_conv, self.v_conv

    def _project(self, x, cache, cu_seqlens):
        """q `[B, T, H, dk]`, every memory's k `[B, T, M', H, dk]`, v `[B, T, M', H, dv]` and
        log-decay g `[B, T, M', H]` (M' = M + shared); advances the conv states of `cache`."""
        B, T, _ = x.shape
        H, memories = self.num_heads, self.memories
        projected = (
            self.q_proj(x),
            torch.einsum("btd,mde->btme", x, self.k_weight).flatten(2),
            torch.einsum("btd,mde->btme", x, self.v_weight).flatten(2),
        )
        states = (None,) * 3 if cache is None else cache.conv
        convs = [
            conv(u, state=state, cu_seqlens=cu_seqlens)
            for conv, u, state in zip(self._convs(), projected, states, strict=True)
        ]
        (q, k, v), new_states = zip(*convs, strict=True)
        if cache is not None:
            cache.conv = new_states
        g = torch.einsum("btd,mdh->btmh", x, self.g_weight) + self.g_bias
        g = F.logsigmoid(g) / self.gate_logit_normalizer
        return (
            q.view(B, T, H, self.key_dim),
            k.view(B, T, memories, H, self.key_dim),
            v.view(B, T, memories, H, self.value_dim),
            g,
        )
