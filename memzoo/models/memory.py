"""Hydra's two memories (Chaudhary, Patel, Chaudhary & Browning, "Hydra", 2025,
arXiv:2508.15099): a workspace of slots written chunk by chunk, and a product-key memory.

The LM calls them as residual sub-blocks, `x = x + memory(norm(x), cache=..., cu_seqlens=...)`,
with the mixer contract of `memzoo.models.mixers.base`.

| name        | layer                                                        |
|-------------|--------------------------------------------------------------|
| `workspace` | S learned slots, read by every token, written once per chunk  |
| `pkm`       | product-key memory (Lample et al. 2019, arXiv:1907.05242)     |

`build_memory(name, d_model, **options)` builds one; unknown names or options are errors
listing the valid ones.

WorkspaceMemory. Slots M_0 `[S, d]` are learned. The tokens of chunk i (`chunk_size`
consecutive positions of a sequence) read M_i, which only chunks < i have written; a finished
chunk i then writes:
    read:   y_t = out_proj(MHA(q = q_proj(x_t), k = k_proj(M_i), v = v_proj(M_i)))
    write:  U_i = MHA(q = write_q(M_i), k = write_k(X_i), v = write_v(X_i))        [S, d]
            M_{i+1} = M_i + sigmoid(write_gate(U_i)) * U_i
MHA is softmax attention with `num_heads` heads of d / num_heads channels, scaled by
1/sqrt(head dim), over all S slots (read) or all `chunk_size` tokens of the chunk (write).
Causal: a token never sees its own chunk, so it depends on itself and earlier chunks only.

ProductKeyMemory (Lample, Sablayrolles, Ranzato, Denoyer & Jegou, "Large Memory Layers with
Product Keys", 2019, arXiv:1907.05242). A query q(x) `[K]` (per head) is split into halves
q1, q2 and each half is scored against `num_keys` sub-keys; key (i, j) is the concatenation of
sub-keys i and j, so its score is q1.c_i + q2.c'_j over num_keys^2 keys. The top-k of each half
hold the overall top-k, so k^2 candidate sums give the exact top-k over all num_keys^2 keys:
    scores, idx = top-k over (i, j) of q1.c_i + q2.c'_j            (exact, k^2 + 2 n scores)
    m = sum_heads sum_j softmax(scores)_j * values[idx_j]           values: [num_keys^2, d]
    y = m * sigmoid(gate(x))
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.models.mixers.base import Mixer, check_mixer_input
from memzoo.models.norm import RMSNorm

__all__ = [
    "MEMORIES",
    "ProductKeyMemory",
    "WorkspaceCache",
    "WorkspaceMemory",
    "build_memory",
    "product_key_topk",
]


def _check_int(who: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")


@dataclass
class WorkspaceCache:
    """Inference state of a WorkspaceMemory for B sequences, replaced in place by each forward.

    slots: `[B, S, d]`, the workspace after the last finished chunk.
    keys, values: `[B, r, H, d / H]`, the write keys and values of the r < chunk_size tokens of
    the unfinished chunk (what its write will attend over once it is finished).
    """

    slots: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class WorkspaceMemory(Mixer):
    """A workspace of `num_slots` slots, written at chunk boundaries (see the module docstring).

    Parameters: slots `[S, d]` (N(0, 1), the scale of the normed tokens they stand beside),
    the read projections q_proj, k_proj, v_proj, out_proj and the write projections write_q,
    write_k, write_v `[d, d]` without bias, and write_gate `[d, d]` with bias.

    Chunks run one after another (T / chunk_size short steps). Packed sequences (cu_seqlens)
    run one at a time from M_0, after one host read of cu_seqlens.
    Inference state: the slots and the write keys/values of at most chunk_size - 1 buffered
    tokens, `state_size = (num_slots + 2 (chunk_size - 1)) d` whatever the length.
    """

    name = "workspace"

    def __init__(
        self, d_model: int, *, num_slots: int = 8, num_heads: int = 1, chunk_size: int = 32
    ):
        super().__init__(d_model)
        _check_int("WorkspaceMemory", "num_slots", num_slots)
        _check_int("WorkspaceMemory", "num_heads", num_heads)
        _check_int("WorkspaceMemory", "chunk_size", chunk_size)
        if d_model % num_heads:
            raise ValueError(
                f"WorkspaceMemory: d_model={d_model} must be divisible by num_heads={num_heads}"
            )
        self.num_slots, self.num_heads, self.chunk_size = num_slots, num_heads, chunk_size
        self.head_dim = d_model // num_heads

        self.slots = nn.Parameter(torch.randn(num_slots, d_model))
        self.slots._no_weight_decay = True
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.write_q = nn.Linear(d_model, d_model, bias=False)
        self.write_k = nn.Linear(d_model, d_model, bias=False)
        self.write_v = nn.Linear(d_model, d_model, bias=False)
        self.write_gate = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(
        self, x: torch.Tensor, *, cache: WorkspaceCache | None = None, cu_seqlens=None
    ) -> torch.Tensor:
        """x `[B, T, d]` -> `[B, T, d]`. With a cache, x continues the rows' sequences."""
        check_mixer_input(self, x, cache, cu_seqlens)
        if cu_seqlens is not None:
            # The one host sync of these layers: each packed sequence then runs alone from M_0.
            bounds = cu_seqlens.tolist()
            pieces = [
                self._run(x[:, a:b], *self._start(x, 1), keep_final=False)[0]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                if b > a
            ]
            return torch.cat(pieces, dim=1)
        if cache is None:
            return self._run(x, *self._start(x, x.shape[0]), keep_final=False)[0]
        y, cache.slots, cache.keys, cache.values = self._run(
            x, cache.slots, cache.keys, cache.values, keep_final=True
        )
        return y

    def _start(self, x: torch.Tensor, batch_size: int):
        """The state of `batch_size` fresh sequences: M_0 and no buffered tokens."""
        slots = self.slots.to(x.dtype).expand(batch_size, -1, -1)
        empty = x.new_zeros(batch_size, 0, self.num_heads, self.head_dim)
        return slots, empty, empty

    def _run(self, x, slots, keys, values, *, keep_final: bool):
        """Read and write the workspace over x `[B, T, d]`, which follows r buffered tokens
        (their write keys/values `[B, r, H, Dh]`) of an unfinished chunk.

        Returns y `[B, T, d]`, and, if keep_final, the slots after the last finished chunk and
        the keys/values of the tokens after it (else None for the slots).
        """
        B, T, d = x.shape
        C, r = self.chunk_size, keys.shape[1]
        keys = torch.cat([keys, self._heads(self.write_k(x))], dim=1)
        values = torch.cat([values, self._heads(self.write_v(x))], dim=1)
        length = r + T
        chunks, finished = -(-length // C), length // C

        # states[i] is what chunk i reads; the write of a last, finished chunk is needed only
        # to carry on in a cache.
        states = [slots]
        for i in range(finished if keep_final else chunks - 1):
            span = slice(i * C, (i + 1) * C)
            slots = slots + self._write(slots, keys[:, span], values[:, span])
            states.append(slots)

        # Token t of x sits at r + t of the chunked run: pad its queries to whole chunks.
        q = F.pad(self._heads(self.q_proj(x)), (0, 0, 0, 0, r, chunks * C - length))
        q = q.unflatten(1, (chunks, C)).flatten(0, 1).transpose(1, 2)  # [B n, H, C, Dh]
        memory = torch.stack(states[:chunks], dim=1).flatten(0, 1)  # [B n, S, d]
        k = self._heads(self.k_proj(memory)).transpose(1, 2)
        v = self._heads(self.v_proj(memory)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [B n, C, H, Dh]
        y = self.out_proj(o.reshape(B, chunks * C, d)[:, r:length])
        final = states[finished] if keep_final else None
        return y, final, keys[:, finished * C :], values[:, finished * C :]

    def _write(self, slots, keys, values) -> torch.Tensor:
        """The gated update of slots `[B, S, d]` from one finished chunk's keys/values."""
        q = self._heads(self.write_q(slots)).transpose(1, 2)  # [B, H, S, Dh]
        u = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2))
        u = u.transpose(1, 2).flatten(2)  # [B, S, d]
        return torch.sigmoid(self.write_gate(u)) * u

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len=None
    ) -> WorkspaceCache:
        """M_0 for each row and no buffered tokens (max_seq_len is unused: the state is fixed)."""
        device = self.slots.device if device is None else device
        dtype = self.slots.dtype if dtype is None else dtype
        slots = self.slots.detach().to(device=device, dtype=dtype)
        empty = torch.zeros(
            batch_size, 0, self.num_heads, self.head_dim, device=device, dtype=dtype
        )
        return WorkspaceCache(
            slots=slots.expand(batch_size, -1, -1).clone(), keys=empty, values=empty.clone()
        )

    def state_size(self, seq_len: int) -> int:
        """(num_slots + 2 (chunk_size - 1)) d: the slots and the buffered write keys/values."""
        return (self.num_slots + 2 * (self.chunk_size - 1)) * self.d_model


def product_key_topk(
    q: torch.Tensor, keys: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over num_keys^2 product keys.

    q: `[..., H, K]` queries; keys: `[H, 2, n, K / 2]`, the sub-keys of each half per head.
    Returns scores `[..., H, topk]` (descending) and indices `[..., H, topk]` int64 in
    [0, n^2): index i * n + j names the key (c_i, c'_j) with score q1.c_i + q2.c'_j.
    """
    n = keys.shape[2]
    q1, q2 = q.unflatten(-1, (2, -1)).unbind(-2)
    s1, i1 = torch.einsum("...hk,hnk->...hn", q1, keys[:, 0]).topk(topk, dim=-1)
    s2, i2 = torch.einsum("...hk,hnk->...hn", q2, keys[:, 1]).topk(topk, dim=-1)
    candidates = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # [..., H, k * k]
    indices = (i1[..., :, None] * n + i2[..., None, :]).flatten(-2)
    scores, best = candidates.topk(topk, dim=-1)
    return scores, indices.gather(-1, best)


class ProductKeyMemory(Mixer):
    """Product-key memory with a sigmoid output gate (see the module docstring).

    Defaults: num_keys n = 32 sub-keys per half (n^2 = 1024 values), topk 8, one head,
    key_dim = d / 2 rounded down to even. The paper's query network is Linear + BatchNorm; here
    an RMSNorm per head replaces the BatchNorm, so the query scale does not depend on the batch
    and decoding equals the full forward. Values of all heads are summed.

    Parameters: query `[H key_dim, d]` (+ bias), query_norm `[key_dim]`, keys
    `[H, 2, n, key_dim / 2]` (U(+-1/sqrt(key_dim / 2)) as in the paper's code), values
    nn.Embedding(n^2, d) (N(0, 1/d)), gate `[d, d]` (+ bias).
    Stateless per token: no cache, `state_size` 0, cu_seqlens changes nothing.
    """

    name = "pkm"

    def __init__(
        self,
        d_model: int,
        *,
        num_keys: int = 32,
        topk: int = 8,
        key_dim: int | None = None,
        num_heads: int = 1,
    ):
        super().__init__(d_model)
        _check_int("ProductKeyMemory", "num_keys", num_keys)
        _check_int("ProductKeyMemory", "topk", topk)
        if topk > num_keys:
            raise ValueError(
                f"ProductKeyMemory: topk={topk} must be <= num_keys={num_keys} (each half keeps "
                "its own top-k sub-keys)"
            )
        key_dim = 2 * max(1, d_model // 4) if key_dim is None else key_dim
        _check_int("ProductKeyMemory", "key_dim", key_dim, minimum=2)
        if key_dim % 2:
            raise ValueError(f"ProductKeyMemory: key_dim must be even (two halves), got {key_dim}")
        _check_int("ProductKeyMemory", "num_heads", num_heads)
        self.num_keys, self.topk, self.key_dim, self.num_heads = num_keys, topk, key_dim, num_heads

        self.query = nn.Linear(d_model, num_heads * key_dim)
        self.query_norm = RMSNorm(key_dim)
        half = key_dim // 2
        bound = 1 / math.sqrt(half)
        self.keys = nn.Parameter(torch.empty(num_heads, 2, num_keys, half).uniform_(-bound, bound))
        self.values = nn.Embedding(num_keys**2, d_model)
        nn.init.normal_(self.values.weight, std=d_model**-0.5)
        self.values.weight._no_weight_decay = True
        self.gate = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, *, cache=None, cu_seqlens=None) -> torch.Tensor:
        """x `[B, T, d]` -> gated memory read `[B, T, d]`, each token on its own."""
        check_mixer_input(self, x, cache, cu_seqlens)
        B, T, d = x.shape
        q = self.query_norm(self.query(x).unflatten(-1, (self.num_heads, self.key_dim)))
        # Scores in fp32 (fp64 for fp64 models): in bf16 many of the k^2 candidate scores would
        # round onto ties at the top-k cutoff, and ties are broken arbitrarily.
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        scores, indices = product_key_topk(q.to(compute), self.keys.to(compute), self.topk)
        weights = scores.softmax(-1).to(self.values.weight.dtype)
        bags = self.num_heads * self.topk
        memory = F.embedding_bag(
            indices.reshape(B * T, bags),
            self.values.weight,
            per_sample_weights=weights.reshape(B * T, bags),
            mode="sum",
        )
        return memory.view(B, T, d).to(x.dtype) * torch.sigmoid(self.gate(x))

    def init_cache(self, batch_size: int, *, device=None, dtype=None, max_seq_len=None):
        """None: each token reads the memory alone, nothing is carried between calls."""
        return None

    def state_size(self, seq_len: int) -> int:
        return 0


MEMORIES: dict[str, type[Mixer]] = {"workspace": WorkspaceMemory, "pkm": ProductKeyMemory}


def build_memory(name: str, d_model: int, **options) -> Mixer:
    """Build memory `name`; an unknown name or option is an error listing the valid ones."""
    if name not in MEMORIES:
        raise ValueError(f"unknown memory {name!r}; valid memories: {', '.join(sorted(MEMORIES))}")
    params = inspect.signature(MEMORIES[name].__init__).parameters.values()
    valid = sorted(p.name for p in params if p.kind == p.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"memory {name!r}: unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(valid) or '(none)'}"
        )
    return MEMORIES[name](d_model, **options)
