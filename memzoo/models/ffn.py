"""Channel mixers (feed-forward sub-blocks): a GELU MLP, SwiGLU, and Hydra's chunk-level MoE.

The LM calls them as residual sub-blocks, `x = x + ffn(norm(x), cache=..., cu_seqlens=...)`, with
the mixer contract of `memzoo.models.mixers.base` so every sub-block is driven alike. MLP and
SwiGLU act on each token alone: no cache (`init_cache` returns None), `state_size` 0.

| name     | layer                                                            |
|----------|------------------------------------------------------------------|
| `mlp`    | Linear(d, 4d) -> GELU -> Linear(4d, d) (the Transformer FFN)       |
| `swiglu` | w2(silu(w1 x) * w3 x), hidden 8/3 d (Shazeer 2020, arXiv:2002.05202) |
| `moe`    | chunk-level top-k mixture of SwiGLU experts (Hydra, arXiv:2508.15099) |

`build_ffn(name, d_model, **options)` builds one; unknown names or options are errors listing
the valid ones.

ChunkMoE (Chaudhary, Patel, Chaudhary & Browning, "Hydra", 2025, arXiv:2508.15099): tokens are
grouped in chunks of `chunk_size` consecutive positions of their sequence and every token of a
chunk goes to the chunk's top-k experts. Routing is causal: chunk c is routed from the mean of
chunk c - 1 (a learned vector for a sequence's first chunk), so nothing in chunk c or later
decides where chunk c goes:
    r_c = first_chunk_input if c == 0 else mean(x of chunk c - 1)           [d]
    p_c = softmax(router(r_c))                                              [E]
    (e_1..e_k), (g_1..g_k) = top-k of p_c, renormalised to sum to 1
    y_t = sum_j g_j * expert_{e_j}(x_t)   for t in chunk c,   expert_e = SwiGLU with weights e
Load balancing (Switch Transformer, Fedus et al. 2021): aux_loss = E * sum_e f_e * P_e over the
chunks in the call, f_e the fraction of the chunks' k expert slots given to e and P_e the mean
router probability of e.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.models.mixers.base import Mixer, check_mixer_input
from memzoo.models.rope import positions_for

__all__ = [
    "FFNS",
    "MLP",
    "ChunkMoE",
    "ChunkRouting",
    "MoECache",
    "SwiGLU",
    "build_ffn",
    "swiglu_hidden",
]


def _check_int(who: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")


def swiglu_hidden(d_model: int, multiple_of: int = 16) -> int:
    """8/3 d_model rounded up to a multiple of `multiple_of`: the hidden width at which SwiGLU's
    three matrices hold as many parameters as a 4 d_model MLP's two."""
    return -(-8 * d_model // (3 * multiple_of)) * multiple_of


class MLP(Mixer):
    """fc2(gelu(fc1(x))) per token, exact (erf) GELU; fc1 `[hidden, d]`, fc2 `[d, hidden]`."""

    name = "mlp"

    def __init__(self, d_model: int, *, hidden: int | None = None, bias: bool = False):
        super().__init__(d_model)
        hidden = 4 * d_model if hidden is None else hidden
        _check_int("MLP", "hidden", hidden)
        self.hidden = hidden
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        return self.fc2(F.gelu(self.fc1(x)))

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """None: each token is transformed alone, nothing is carried between calls."""
        return None

    def state_size(self, seq_len: int) -> int:
        return 0


class SwiGLU(Mixer):
    """w2(silu(w1 x) * w3 x) per token (LLaMA naming), no biases; w1, w3 `[hidden, d]`,
    w2 `[d, hidden]`, hidden = `swiglu_hidden(d_model, multiple_of)` unless given."""

    name = "swiglu"

    def __init__(self, d_model: int, *, hidden: int | None = None, multiple_of: int = 16):
        super().__init__(d_model)
        _check_int("SwiGLU", "multiple_of", multiple_of)
        hidden = swiglu_hidden(d_model, multiple_of) if hidden is None else hidden
        _check_int("SwiGLU", "hidden", hidden)
        self.hidden = hidden
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        check_mixer_input(self, x, cache, cu_seqlens)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """None: each token is transformed alone, nothing is carried between calls."""
        return None

    def state_size(self, seq_len: int) -> int:
        return 0


@dataclass
class MoECache:
    """Routing state of a ChunkMoE for B sequences decoded side by side, updated in place.

    seen: tokens consumed by every row so far (rows advance together).
    chunk_sum: `[B, d]` sum of the tokens of the current, unfinished chunk (zero at a boundary).
    route_input: `[B, d]` router input of the chunk that holds the next token.
    Both in fp32 (fp64 for an fp64 model).
    """

    seen: int
    chunk_sum: torch.Tensor
    route_input: torch.Tensor


class ChunkRouting(NamedTuple):
    """Where `ChunkMoE.route` sends each token.

    experts, weights: `[B, T, topk]`, the token's chunk's experts (int64) and their
    renormalised router probabilities (fp32, fp64 for fp64 inputs).
    aux_loss: scalar load-balancing loss over the chunks that have a token in x.
    chunk_sum, route_input: the cache's values after x (None without a cache).
    """

    experts: torch.Tensor
    weights: torch.Tensor
    aux_loss: torch.Tensor
    chunk_sum: torch.Tensor | None
    route_input: torch.Tensor | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in fp32 whatever the activations (fp64 for fp64 models): a near tie between
    two experts must not flip between a full forward and decoding."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkMoE(Mixer):
    """Chunk-level top-k mixture of SwiGLU experts with causal routing (see the module docstring).

    Parameters: router `[E, d]`, first_chunk_input `[d]`, and the stacked experts w1, w3
    `[E, d, hidden]`, w2 `[E, hidden, d]` (hidden = swiglu_hidden(d) unless given), each
    initialised like nn.Linear.

    Compute. A call with few tokens (B * T * topk < E: decoding small batches) gathers the
    chosen experts' weights per token and runs only those. Eager on CPU, each expert then runs
    on the tokens whose chunk picked it (the per-expert counts are read on the host, which costs
    nothing there). Elsewhere, and under torch.compile, every expert runs densely on every token
    and a gate that is zero for the experts a token's chunk did not pick combines them: E / topk
    times the FLOPs of the selected experts (4x at the defaults), traded for no host syncs, no
    dropped tokens and one GEMM per weight matrix. All three paths give the same outputs.

    `aux_loss` is set by every forward, training or eval, over the chunks with a token in x.
    Inference state: the sum of the current chunk's tokens and the next router input,
    `state_size = 2 d` whatever the length.
    """

    name = "moe"

    def __init__(
        self,
        d_model: int,
        *,
        num_experts: int = 8,
        topk: int = 2,
        chunk_size: int = 16,
        hidden: int | None = None,
    ):
        super().__init__(d_model)
        _check_int("ChunkMoE", "num_experts", num_experts)
        _check_int("ChunkMoE", "topk", topk)
        if topk > num_experts:
            raise ValueError(f"ChunkMoE: topk={topk} must be <= num_experts={num_experts}")
        _check_int("ChunkMoE", "chunk_size", chunk_size)
        hidden = swiglu_hidden(d_model) if hidden is None else hidden
        _check_int("ChunkMoE", "hidden", hidden)
        self.num_experts, self.topk = num_experts, topk
        self.chunk_size, self.hidden = chunk_size, hidden

        self.router = nn.Linear(d_model, num_experts, bias=False)
        # The router input of every sequence's first chunk, which has no previous chunk.
        self.first_chunk_input = nn.Parameter(torch.empty(d_model).normal_(std=0.02))
        self.first_chunk_input._no_weight_decay = True
        self.w1 = nn.Parameter(self._linear_init(num_experts, d_model, hidden))
        self.w3 = nn.Parameter(self._linear_init(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(self._linear_init(num_experts, hidden, d_model))

    @staticmethod
    def _linear_init(num_experts: int, fan_in: int, fan_out: int) -> torch.Tensor:
        """nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for E stacked `[in, out]`."""
        bound = 1 / math.sqrt(fan_in)
        return torch.empty(num_experts, fan_in, fan_out).uniform_(-bound, bound)

    def forward(
        self, x: torch.Tensor, *, cache: MoECache | None = None, cu_seqlens=None
    ) -> torch.Tensor:
        """x `[B, T, d]` -> `[B, T, d]`; sets `aux_loss`. With a cache, x continues the rows."""
        check_mixer_input(self, x, cache, cu_seqlens)
        routing = self.route(x, cache=cache, cu_seqlens=cu_seqlens)
        self.aux_loss = routing.aux_loss
        if cache is not None:
            cache.seen += x.shape[1]
            cache.chunk_sum, cache.route_input = routing.chunk_sum, routing.route_input
        return self._experts(x, routing.experts, routing.weights.to(x.dtype))

    def route(
        self, x: torch.Tensor, *, cache: MoECache | None = None, cu_seqlens=None
    ) -> ChunkRouting:
        """The experts and weights of every token of x `[B, T, d]` (the cache is only read).

        Chunks are numbered in order of appearance ("slots"): slot 0 is the first token's
        chunk, which with a cache may have begun in an earlier call. With cu_seqlens,
        positions restart at every sequence start, and so do chunks.
        """
        B, T, d = x.shape
        C, compute = self.chunk_size, _compute_dtype(x.dtype)
        seen = 0 if cache is None else cache.seen
        pos = positions_for(B, T, offset=seen, cu_seqlens=cu_seqlens, device=x.device)
        starts = (pos % C == 0).long()
        slot = starts.cumsum(0) - starts[:1]
        if cu_seqlens is None:
            num_slots = (seen % C + T - 1) // C + 1
        else:
            # sum_s ceil(L_s / C) <= T // C + N bounds the chunk count without reading cu_seqlens
            # on the host; slots beyond the real count stay empty and are masked out below.
            num_slots = min(T, T // C + cu_seqlens.numel() - 1)

        sums = x.new_zeros(B, num_slots, d, dtype=compute).index_add_(1, slot, x.to(compute))
        if cache is not None:
            sums[:, 0] += cache.chunk_sum
        first_chunk = torch.zeros(num_slots, dtype=torch.bool, device=x.device)
        first_chunk = first_chunk.scatter_(0, slot, pos < C)
        present = torch.zeros_like(first_chunk).index_fill_(0, slot, True)

        # Slot s is routed by the mean of slot s - 1 (complete, as slot s has begun), slot 0 by
        # the cached input; a sequence's first chunk by the learned input instead.
        before = self.first_chunk_input.to(compute).expand(B, d)
        if cache is not None:
            before = cache.route_input
        inputs = torch.cat([before[:, None], sums[:, :-1] / C], dim=1)
        inputs = torch.where(first_chunk[:, None], self.first_chunk_input.to(compute), inputs)
        probs = F.linear(inputs, self.router.weight.to(compute)).softmax(-1)  # [B, S, E]
        top_p, top_e = probs.topk(self.topk, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)

        mask = present.to(compute)[None, :, None]
        chunks = mask.sum() * B
        picked = torch.zeros_like(probs).scatter_(-1, top_e, 1.0)
        fraction = (picked * mask).sum((0, 1)) / (chunks * self.topk)
        mean_prob = (probs * mask).sum((0, 1)) / chunks
        aux_loss = self.num_experts * (fraction * mean_prob).sum()

        chunk_sum = route_input = None
        if cache is not None:
            if (seen + T) % C == 0:  # the last chunk is finished: it routes the next one
                chunk_sum, route_input = torch.zeros_like(sums[:, -1]), sums[:, -1] / C
            else:
                chunk_sum, route_input = sums[:, -1], inputs[:, -1]
        return ChunkRouting(top_e[:, slot], top_p[:, slot], aux_loss, chunk_sum, route_input)

    def _experts(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
        """sum_j weights_j * expert_{experts_j}(x): x `[B, T, d]`, experts/weights `[B, T, k]`."""
        B, T, _ = x.shape
        if B * T * self.topk < self.num_experts:
            return self._experts_gathered(x, experts, weights)
        # Reading the counts would break a compiled graph: compiled code keeps the dense path.
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return self._experts_grouped(x, experts, weights)
        return self._experts_dense(x, experts, weights)

    def _experts_gathered(self, x, experts, weights):
        """Each token through its own k experts' weights, gathered per token."""
        w1, w3, w2 = self.w1[experts], self.w3[experts], self.w2[experts]  # [B, T, k, ...]
        h = F.silu(torch.einsum("btd,btkdh->btkh", x, w1))
        h = h * torch.einsum("btd,btkdh->btkh", x, w3)
        return torch.einsum("btkh,btkhd->btd", h * weights[..., None], w2)

    def _experts_grouped(self, x, experts, weights):
        """Each expert on the tokens that picked it: topk / E of the dense path's FLOPs."""
        flat = x.reshape(-1, x.shape[-1])
        picks = experts.reshape(-1)  # token i's slots are picks[i * k : (i + 1) * k]
        order = torch.argsort(picks, stable=True)
        counts = torch.bincount(picks, minlength=self.num_experts).tolist()
        tokens, gates = order // self.topk, weights.reshape(-1)[order]
        out = torch.zeros_like(flat)
        groups = zip(tokens.split(counts), gates.split(counts), strict=True)
        for e, (rows, gate) in enumerate(groups):
            if rows.numel():
                x_e = flat[rows]
                h = F.silu(x_e @ self.w1[e]) * (x_e @ self.w3[e])
                out.index_add_(0, rows, (h @ self.w2[e]) * gate[:, None])
        return out.view_as(x)

    def _experts_dense(self, x, experts, weights):
        """Every expert on every token, combined by gates that are zero where not picked."""
        B, T, _ = x.shape
        gates = torch.zeros(B, T, self.num_experts, dtype=x.dtype, device=x.device)
        gates = gates.scatter(-1, experts, weights)
        h = F.silu(torch.einsum("btd,edh->bteh", x, self.w1))
        h = h * torch.einsum("btd,edh->bteh", x, self.w3)
        # Gating the hidden units lets one contraction over (expert, hidden) sum the experts.
        return torch.einsum("bteh,ehd->btd", h * gates[..., None], self.w2)

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None) -> MoECache:
        """Routing state before any token (max_seq_len is unused: the state is fixed)."""
        device = self.router.weight.device if device is None else device
        compute = _compute_dtype(self.router.weight.dtype if dtype is None else dtype)
        zeros = torch.zeros(batch_size, self.d_model, device=device, dtype=compute)
        # route_input is not read before the first chunk ends: chunk 0 uses first_chunk_input.
        return MoECache(seen=0, chunk_sum=zeros, route_input=zeros.clone())

    def state_size(self, seq_len: int) -> int:
        """2 d: the current chunk's token sum and the next chunk's router input."""
        return 2 * self.d_model


FFNS: dict[str, type[Mixer]] = {"mlp": MLP, "swiglu": SwiGLU, "moe": ChunkMoE}


def build_ffn(name: str, d_model: int, **options) -> Mixer:
    """Build FFN `name`; an unknown name or option is an error listing the valid ones."""
    if name not in FFNS:
        raise ValueError(f"unknown FFN {name!r}; valid FFNs: {', '.join(sorted(FFNS))}")
    params = inspect.signature(FFNS[name].__init__).parameters.values()
    valid = sorted(p.name for p in params if p.kind == p.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"FFN {name!r}: unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(valid) or '(none)'}"
        )
    return FFNS[name](d_model, **options)
