"""MemMamba layer: Wang, Chen, Yan, Lu & Sun, "MemMamba: Rethinking Memory Patterns in State
Space Model", 2025, arXiv:2510.03279. The paper publishes no code; this file defines the layer
precisely and every choice below is ours where the paper leaves it open.

A Mamba block (`ssm="mamba"`, Mamba-1 by default, or `"mamba2"`) followed by a Note Block. For
the layer input x `[B, T, d_model]` (the normed residual stream):

    m     = Mamba(x)                               [B, T, d_model]
    s_t   = sigmoid(w_s . x_t + b_s)               importance score
    n_t   = s_t * W_note x_t                       note [note_dim], written when s_t > tau1
    r_t   = read of the pool's notes before t      [note_dim]: softmax attention with query
                                                   W_q m_t, keys = values = notes, note_heads
                                                   heads of note_dim / note_heads
    g_t   = sigmoid(w_g . m_t + b_g)               state-importance score, the read gate
    out_t = m_t + g_t * (W_o r_t [+ W_o' c_t])     c_t: the cross-layer read

- Pool: the layer keeps the last K = pool_size notes, first in, first out, so token t reads the
  last K notes written strictly before t (`memzoo.kernels.memmamba.note_attention`); a token
  with none reads zero. Selection is a hard threshold; scaling the note by s_t keeps the scorer
  trainable (its gradient flows through the notes that are read).
- Read gate and tau2: the paper skips the read when the state-importance score is low. We use
  g_t as a soft gate in training (tau2 is ignored there, so gradients reach w_g); in eval mode
  with tau2 > 0 the read of a token with g_t < tau2 is dropped (g_t -> 0). The rule depends on
  token t alone, so the parallel and recurrent forms agree in both modes. tau2 = 0 (default)
  never drops a read.
- Cross-layer read (every p = cross_layer_every layers: layers with (layer_idx + 1) % p == 0):
  tokens also read the pools of the MemMamba layers among the previous p layers
  [layer_idx - p, layer_idx), with the same causality (each source's last K notes written
  before t), through one softmax over the union of those notes (the per-pool reads merged by
  their log-sum-exp), with its own query W_q' m_t and output W_o'. The LM hands each layer its
  earlier layers (`connect_layers`, which also creates these two projections when the layer
  has sources); a layer publishes the notes its tokens could see in `note_view` for them.

Defaults: Mamba-1 (d_state 16, d_conv 4, expand 2), note_dim 64, one note head, pool_size 64,
tau1 = 0.5, tau2 = 0, cross_layer_every = 4 (0 turns cross-layer reads off). Init: the Mamba
block keeps mamba-ssm's; every projection here nn.Linear's default; the scorer's and the gate's
biases zero, so s_t and g_t start near 0.5 (about half the tokens write; reads enter half open).

Inference state per sequence: the Mamba state plus the pool `[K, note_dim]` (and a note
counter), so `state_size = ssm.state_size + K * note_dim`; cross-layer reads read other layers'
pools and add no state of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from memzoo.kernels.memmamba import (
    compact_notes,
    note_attention,
    note_attention_step,
    pool_window,
    pool_write,
    select_notes,
)
from memzoo.models.mixers import build_mixer
from memzoo.models.mixers.base import Mixer, check_mixer_input

__all__ = ["MemMamba", "MemMambaCache", "NoteView"]

SSMS = ("mamba", "mamba2")


@dataclass
class MemMambaCache:
    """Inference state of a MemMamba layer for B sequences, replaced in place by each forward.

    ssm: the Mamba block's cache (`MambaCache` or `Mamba2Cache`).
    pool: `[B, K, note_heads, head_dim]`, the note ring buffer (see memzoo.kernels.memmamba.pool).
    count: `[B]` int64, notes written so far.
    """

    ssm: object
    pool: torch.Tensor
    count: torch.Tensor


@dataclass
class NoteView:
    """The notes a layer's tokens could read in its latest forward, for cross-layer readers.

    notes: `[B, S, note_heads, head_dim]` in rank order, with counts `[B, T]` int32 as
    `note_attention` takes them; or, for a one-token decode step (`step=True`), the ring buffer
    `[B, K, ...]` as it was before the token's write, with counts `[B, 1]` valid slots.
    """

    notes: torch.Tensor
    counts: torch.Tensor
    step: bool


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"MemMamba: {name} must be an int >= {minimum}, got {value!r}")


def _merge_reads(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """One softmax over the union of several pools, from each pool's (o, lse) read.

    o = sum_j w_j o_j with w_j = softmax_j(lse_j); rows that see no note anywhere read 0.
    Shifting by the (detached) max is exact: the shift cancels in the normalisation.
    """
    lse = torch.stack(lses)  # [P, B, T, H]
    top = lse.amax(dim=0, keepdim=True).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lse - top)
    total = weights.sum(dim=0, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    return sum(w.unsqueeze(-1).to(o.dtype) * o for w, o in zip(weights, outputs, strict=True))


class MemMamba(Mixer):
    """Mamba block + Note Block (note pool, cross-token and cross-layer reads); see the module
    docstring.

    Parameters: ssm (the Mamba block), score `[1, d_model]` + bias, note_proj
    `[note_dim, d_model]`, q_proj `[note_dim, d_model]`, gate `[1, d_model]` + bias, out_proj
    `[d_model, note_dim]`; after `connect_layers` on a cross-layer layer with sources also
    cross_q_proj `[note_dim, d_model]` and cross_out_proj `[d_model, note_dim]`.
    """

    name = "memmamba"

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        ssm: str = "mamba",
        ssm_options: dict | None = None,
        note_dim: int = 64,
        note_heads: int = 1,
        pool_size: int = 64,
        tau1: float = 0.5,
        tau2: float = 0.0,
        cross_layer_every: int = 4,
    ):
        super().__init__(d_model, layer_idx)
        if ssm not in SSMS:
            raise ValueError(f"MemMamba: ssm must be one of {list(SSMS)}, got {ssm!r}")
        if ssm_options is not None and not isinstance(ssm_options, dict):
            raise ValueError(
                f"MemMamba: ssm_options must be a mapping of {ssm} options, got {ssm_options!r}"
            )
        _check_int("note_dim", note_dim, 1)
        _check_int("note_heads", note_heads, 1)
        if note_dim % note_heads:
            raise ValueError(
                f"MemMamba: note_dim={note_dim} must be divisible by note_heads={note_heads}"
            )
        _check_int("pool_size", pool_size, 1)
        _check_int("cross_layer_every", cross_layer_every, 0)
        for name, value in (("tau1", tau1), ("tau2", tau2)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"MemMamba: {name} must be a number, got {value!r}")
        if not 0.0 <= tau2 < 1.0:
            raise ValueError(f"MemMamba: tau2 must be in [0, 1) (a gate threshold), got {tau2!r}")

        self.note_dim, self.note_heads = note_dim, note_heads
        self.head_dim = note_dim // note_heads
        self.pool_size, self.tau1, self.tau2 = pool_size, float(tau1), float(tau2)
        self.cross_layer_every = cross_layer_every

        self.ssm = build_mixer(ssm, d_model, layer_idx, **(ssm_options or {}))
        self.score = nn.Linear(d_model, 1)
        nn.init.zeros_(self.score.bias)  # s = 0.5 +- a little: about half the tokens write
        self.note_proj = nn.Linear(d_model, note_dim, bias=False)
        self.q_proj = nn.Linear(d_model, note_dim, bias=False)
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.bias)  # g = 0.5: the read starts half open
        self.out_proj = nn.Linear(note_dim, d_model, bias=False)

        self.cross_q_proj: nn.Linear | None = None
        self.cross_out_proj: nn.Linear | None = None
        # Earlier layers whose pools this layer reads: plain references (a tuple is not
        # registered as submodules, so their parameters are not duplicated).
        self.sources: tuple[MemMamba, ...] = ()
        self.note_view: NoteView | None = None

    # ---- wiring across layers --------------------------------------------------------------

    @property
    def reads_across_layers(self) -> bool:
        p = self.cross_layer_every
        return p > 0 and (self.layer_idx + 1) % p == 0

    def connect_layers(self, earlier: Sequence[Mixer]) -> None:
        """Take the mixers of the earlier layers; keep the MemMamba ones whose pools this layer
        reads (those with layer_idx in [layer_idx - p, layer_idx) on a cross-layer layer) and
        create the cross-layer projections if there are any. Called once by the LM."""
        if not self.reads_across_layers:
            return
        low = self.layer_idx - self.cross_layer_every
        sources = tuple(
            m for m in earlier if isinstance(m, MemMamba) and low <= m.layer_idx < self.layer_idx
        )
        for source in sources:
            if (source.note_heads, source.head_dim) != (self.note_heads, self.head_dim):
                raise ValueError(
                    f"MemMamba layer {self.layer_idx}: cannot read layer {source.layer_idx}'s "
                    f"pool: its notes have {source.note_heads} heads of {source.head_dim}, "
                    f"this layer's queries {self.note_heads} heads of {self.head_dim}"
                )
        self.sources = sources
        if sources and self.cross_q_proj is None:
            like = self.q_proj.weight
            self.cross_q_proj = nn.Linear(
                self.d_model, self.note_dim, bias=False, device=like.device, dtype=like.dtype
            )
            self.cross_out_proj = nn.Linear(
                self.note_dim, self.d_model, bias=False, device=like.device, dtype=like.dtype
            )

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, cache: MemMambaCache | None = None, cu_seqlens=None):
        """x `[B, T, d_model]` -> `[B, T, d_model]`; see the module docstring for the math.

        With a cache, a chunk of several tokens reads the pool's window followed by its own
        notes; a single token reads the ring buffer (note_attention_step). Either way the
        chunk's notes are written after its reads.
        """
        check_mixer_input(self, x, cache, cu_seqlens)
        B, T, _ = x.shape
        m = self.ssm(x, cache=None if cache is None else cache.ssm, cu_seqlens=cu_seqlens)

        scores = torch.sigmoid(self.score(x)).squeeze(-1)  # [B, T]
        notes = (scores.unsqueeze(-1) * self.note_proj(x)).view(B, T, self.note_heads, -1)
        view = self._note_view(notes, scores, cache)
        read, _ = self._read(self._heads(self.q_proj(m)), view, self.pool_size, cu_seqlens)
        update = self.out_proj(read.reshape(B, T, self.note_dim))
        if self.cross_q_proj is not None:
            update = update + self.cross_out_proj(self._read_sources(m, view, cu_seqlens))

        gate = torch.sigmoid(self.gate(m))  # [B, T, 1]
        if self.tau2 > 0 and not self.training:
            gate = gate * (gate >= self.tau2)

        if cache is not None:
            cache.pool, cache.count = pool_write(cache.pool, cache.count, notes, scores > self.tau1)
        self.note_view = view
        return m + gate * update

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.note_heads, self.head_dim)

    def _note_view(self, notes, scores, cache: MemMambaCache | None) -> NoteView:
        """The notes this chunk's tokens may read, in the form `_read` takes."""
        if cache is not None and notes.shape[1] == 1:
            num_valid = cache.count.clamp(max=self.pool_size)
            return NoteView(cache.pool, num_valid.to(torch.int32)[:, None], step=True)
        selection = select_notes(scores, self.tau1)
        if cache is None:
            return NoteView(compact_notes(notes, selection.positions), selection.counts, False)
        window, num_valid = pool_window(cache.pool, cache.count)
        compact = compact_notes(notes, selection.positions, prefix=window, prefix_valid=num_valid)
        counts = selection.counts + num_valid.to(torch.int32)[:, None]
        return NoteView(compact, counts, step=False)

    @staticmethod
    def _read(q, view: NoteView, capacity: int, cu_seqlens):
        """(o `[B, T, H, head_dim]`, lse `[B, T, H]`) of queries q over a view's notes."""
        if view.step:
            o, lse = note_attention_step(
                q[:, 0], view.notes, view.notes, view.counts[:, 0], return_lse=True
            )
            return o.unsqueeze(1), lse.unsqueeze(1)
        return note_attention(
            q, view.notes, view.notes, view.counts, capacity, cu_seqlens=cu_seqlens, return_lse=True
        )

    def _read_sources(self, m, own: NoteView, cu_seqlens) -> torch.Tensor:
        """The cross-layer read `[B, T, note_dim]`: one softmax over the sources' pools."""
        q = self._heads(self.cross_q_proj(m))
        outputs, lses = [], []
        for source in self.sources:
            view = source.note_view
            if view is None or view.step != own.step or view.counts.shape != own.counts.shape:
                raise RuntimeError(
                    f"MemMamba layer {self.layer_idx} reads the pool of layer "
                    f"{source.layer_idx}, which has not run on this input: run the layers in "
                    "order (the LM does)"
                )
            o, lse = self._read(q, view, source.pool_size, cu_seqlens)
            outputs.append(o)
            lses.append(lse)
        return _merge_reads(outputs, lses).reshape(*m.shape[:2], self.note_dim)

    # ---- inference state -------------------------------------------------------------------

    def init_cache(
        self, batch_size: int, *, device=None, dtype=None, max_seq_len=None
    ) -> MemMambaCache:
        """The Mamba block's zero state and an empty pool (max_seq_len is unused: the state is
        fixed). The pool holds notes in the activation dtype, like a KV cache."""
        like = self.q_proj.weight
        device = like.device if device is None else device
        dtype = like.dtype if dtype is None else dtype
        return MemMambaCache(
            ssm=self.ssm.init_cache(batch_size, device=device, dtype=dtype),
            pool=torch.zeros(
                batch_size,
                self.pool_size,
                self.note_heads,
                self.head_dim,
                device=device,
                dtype=dtype,
            ),  # fmt: skip
            count=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def state_size(self, seq_len: int) -> int:
        """The Mamba block's state plus the pool, K * note_dim, for any length."""
        return self.ssm.state_size(seq_len) + self.pool_size * self.note_dim
