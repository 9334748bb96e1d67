"""The language model: token embedding, a stack of blocks built from a layer pattern, RMSNorm,
and a (tied) LM head, with cached recurrent generation and safetensors save/load.

A block is pre-norm. Sequential (the default): for each mixer of the layer
`x = x + mixer(norm(x))`, then each memory `x = x + memory(norm(x))`, then
`x = x + ffn(norm(x))`. Parallel (Hydra): `x = x + sum_i g_i branch_i(norm(x))` over the
layer's mixers, memories and FFN with learned scalar gates g (initialised to 1 / branches).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memzoo.models.cache import LayerCache, LMCache
from memzoo.models.config import LMConfig
from memzoo.models.ffn import build_ffn
from memzoo.models.memory import build_memory
from memzoo.models.mixers import build_mixer
from memzoo.models.norm import RMSNorm

__all__ = ["LM"]

CONFIG_FILE = "config.json"
# The parameters of a branch that write into the residual stream: mixers' and memories'
# out_proj, the FFNs' w2 (the MoE's stacked experts: w2).
_OUTPUT_PROJECTIONS = ("out_proj.weight", "w2.weight", "w2")
WEIGHTS_FILE = "model.safetensors"


class Block(nn.Module):
    """Layer i of an LM: its mixers, memories and FFN (see the module docstring)."""

    def __init__(self, config: LMConfig, i: int):
        super().__init__()
        d = config.d_model
        self.parallel = config.block == "parallel"
        self.mixers = nn.ModuleList(
            build_mixer(name, d, i, **config.mixer_options.get(name, {}))
            for name in config.layer_mixers(i)
        )
        self.memories = nn.ModuleList(
            build_memory(kind, d, **options) for kind, options in config.layer_memories(i)
        )
        ffn_name, ffn_options = config.layer_ffn(i)
        self.ffn = None if ffn_name == "none" else build_ffn(ffn_name, d, **ffn_options)
        if self.parallel:
            self.norm = RMSNorm(d, config.norm_eps)
            branches = len(self.mixers) + len(self.memories) + (self.ffn is not None)
            self.gates = nn.Parameter(torch.full((branches,), 1.0 / branches))
        else:
            count = len(self.mixers) + len(self.memories) + (self.ffn is not None)
            self.norms = nn.ModuleList(RMSNorm(d, config.norm_eps) for _ in range(count))

    def branches(self) -> list[nn.Module]:
        return [*self.mixers, *self.memories, *([self.ffn] if self.ffn is not None else [])]

    def init_cache(self, batch_size: int, *, device, dtype, max_seq_len: int) -> LayerCache:
        def state(m, **extra):
            return m.init_cache(batch_size, device=device, dtype=dtype, **extra)

        return LayerCache(
            mixers=[state(m, max_seq_len=max_seq_len) for m in self.mixers],
            memories=[state(m) for m in self.memories],
            ffn=None if self.ffn is None else state(self.ffn),
        )

    def forward(self, x, *, cache: LayerCache | None = None, cu_seqlens=None) -> torch.Tensor:
        caches = [None] * len(self.branches())
        if cache is not None:
            caches = [
                *cache.mixers,
                *cache.memories,
                *([cache.ffn] if self.ffn is not None else []),
            ]
        if self.parallel:
            h = self.norm(x)
            out = x
            for gate, branch, c in zip(self.gates, self.branches(), caches, strict=True):
                out = out + gate * branch(h, cache=c, cu_seqlens=cu_seqlens)
            return out
        for norm, branch, c in zip(self.norms, self.branches(), caches, strict=True):
            x = x + branch(norm(x), cache=c, cu_seqlens=cu_seqlens)
        return x

    def aux_loss(self) -> torch.Tensor | None:
        losses = [b.aux_loss for b in self.branches() if getattr(b, "aux_loss", None) is not None]
        return sum(losses) if losses else None


class LM(nn.Module):
    """A causal LM over `config.vocab_size` tokens assembled from `config.pattern`.

    forward(input_ids `[B, T]` int64, cu_seqlens=None, cache=None) -> logits `[B, T, V]`;
    `aux_loss` (sum of the routers' losses, or None) is set by every forward.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # Mixers that read earlier layers' state (MemMamba's cross-layer reads) get references
        # to the mixers of every earlier layer.
        earlier = []
        for block in self.blocks:
            for mixer in block.mixers:
                if hasattr(mixer, "connect_layers"):
                    mixer.connect_layers(tuple(earlier))
            earlier.extend(block.mixers)
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=config.init_std)
        self._rescale_residual_outputs()
        self.aux_loss: torch.Tensor | None = None

    @torch.no_grad()
    def _rescale_residual_outputs(self) -> None:
        """Divide each branch's output projection by sqrt(residual branches in the model), as
        GPT-2 and mamba-ssm do, so the residual stream's variance does not grow with depth."""
        branches = sum(len(block.branches()) for block in self.blocks)
        for block in self.blocks:
            for branch in block.branches():
                for name, p in branch.named_parameters():
                    if name in _OUTPUT_PROJECTIONS:
                        p /= math.sqrt(branches)

    # ---- forward ---------------------------------------------------------------------------

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"LM: input_ids must be [B, T], got {shape!r}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"LM: input_ids must be int32/int64, got {input_ids.dtype}")
        # On CPU the range check is free; on CUDA it would be a host sync, and under
        # torch.compile a graph break, so embedding's own check is left to catch it there.
        if (
            input_ids.device.type == "cpu"
            and input_ids.numel()
            and not torch.compiler.is_compiling()
        ):
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"LM: token ids must lie in [0, vocab_size={self.config.vocab_size}), "
                    f"got values in [{low}, {high}]"
                )

    def hidden_states(self, input_ids, *, cu_seqlens=None, cache: LMCache | None = None):
        """The final normed hidden states `[B, T, d_model]` (sets `aux_loss`)."""
        self._check_ids(input_ids)
        x = self.embed(input_ids)
        layer_caches = [None] * len(self.blocks) if cache is None else cache.layers
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, cache=layer_cache, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        losses = [loss for b in self.blocks if (loss := b.aux_loss()) is not None]
        self.aux_loss = sum(losses) if losses else None
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head over hidden states `[..., d_model]` -> `[..., vocab_size]`."""
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h, weight)

    def forward(
        self,
        input_ids,
        *,
        labels=None,
        cu_seqlens=None,
        cache: LMCache | None = None,
        only_labeled: bool = False,
    ):
        """Logits `[B, T, V]`; with `labels` `[B, T]`, the mean cross-entropy instead.

        labels: the target of each position, already shifted (-100 = ignored). `only_labeled`
        computes logits only where a label is set (a host sync, worth it when few positions
        carry labels and the vocabulary is large). Going through forward (not a separate
        method) keeps DDP's and FSDP's hooks in the loop.
        """
        h = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, cache=cache)
        if labels is None:
            return self.logits(h)
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"LM: labels must match input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        if only_labeled:
            keep = labels != -100
            return F.cross_entropy(self.logits(h[keep]).float(), labels[keep])
        logits = self.logits(h).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    def loss(self, input_ids, labels, *, cu_seqlens=None, only_labeled: bool = False):
        """Mean cross-entropy of `labels` (see forward)."""
        return self(input_ids, labels=labels, cu_seqlens=cu_seqlens, only_labeled=only_labeled)

    # ---- generation ------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_seq_len: int, *, device=None, dtype=None) -> LMCache:
        """Empty caches for B sequences of up to max_seq_len tokens."""
        device = self.embed.weight.device if device is None else device
        dtype = self.embed.weight.dtype if dtype is None else dtype
        layers = [
            block.init_cache(batch_size, device=device, dtype=dtype, max_seq_len=max_seq_len)
            for block in self.blocks
        ]
        return LMCache(layers=layers, max_seq_len=max_seq_len)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        prefill_chunk: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue prompts `[B, T]` (all of length T) by max_new_tokens tokens each.

        The prompt runs through the per-layer caches in chunks of `prefill_chunk` tokens
        (default: all at once), then one token per step. greedy takes the argmax; otherwise
        tokens are sampled from softmax(logits / temperature) restricted to the top_k.
        Returns `[B, T + max_new_tokens]`.
        """
        self._check_ids(input_ids)
        if max_new_tokens < 0:
            raise ValueError(f"LM.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if not greedy and temperature <= 0:
            raise ValueError(f"LM.generate: temperature must be > 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(
                f"LM.generate: top_k must be in [1, vocab_size={self.config.vocab_size}], "
                f"got {top_k}"
            )
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("LM.generate: the prompt must hold at least one token")
        if max_new_tokens == 0:
            return input_ids
        cache = self.init_cache(B, T + max_new_tokens)
        step = T if prefill_chunk is None else prefill_chunk
        if step < 1:
            raise ValueError(f"LM.generate: prefill_chunk must be >= 1, got {prefill_chunk}")
        for start in range(0, T, step):
            h = self.hidden_states(input_ids[:, start : start + step], cache=cache)
        out = [input_ids]
        for i in range(max_new_tokens):
            logits = self.logits(h[:, -1]).float()
            token = self._pick(logits, temperature, top_k, greedy, generator)
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                h = self.hidden_states(token[:, None], cache=cache)
        return torch.cat(out, dim=1)

    @staticmethod
    def _pick(logits, temperature, top_k, greedy, generator) -> torch.Tensor:
        if greedy:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    # ---- sizes -----------------------------------------------------------------------------

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count (a tied head counts once); embeddings=False leaves out the table."""
        total = sum(p.numel() for p in self.parameters())
        return total if embeddings else total - self.embed.weight.numel()

    def state_size(self, seq_len: int) -> int:
        """Floats of inference state per sequence after seq_len tokens, over all layers."""
        return sum(m.state_size(seq_len) for b in self.blocks for m in b.branches())

    # ---- save / load -----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors into `directory`, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, path))
        _atomic_write(
            directory / CONFIG_FILE, lambda path: Path(path).write_text(self.config.to_json())
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, device="cpu") -> LM:
        """Load an LM written by `save_pretrained` (safetensors: no code is ever executed)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"LM.from_pretrained: {directory / name} does not exist")
        config = LMConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        model = cls(config)
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        where = f"LM.from_pretrained: {directory / WEIGHTS_FILE} does not match its config"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"{where}: {error}") from error
        if missing or unexpected:
            raise ValueError(f"{where}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        return model.to(device)


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) into a temporary file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
