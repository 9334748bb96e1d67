"""LMConfig: everything that defines an LM's architecture, validated on construction.

Loaded from dicts or YAML (the `model:` section of a run config, or a bare mapping); an unknown
key, mixer, FFN or memory name is an error that lists the valid ones. Example (a Hydra-style
hybrid: Mamba backbone, sliding-window attention every 4th layer, MoE FFN every 2nd)::

    model:
      d_model: 256
      n_layers: 8
      vocab_size: 260
      pattern: [mamba, mamba, mamba, swa]      # repeated to n_layers
      mixer_options: {swa: {window: 128, num_heads: 4}}
      ffn: swiglu
      moe_every: 2
      memories: [{type: pkm, layers: [4]}]
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memzoo._config import check_field_types, load_yaml
from memzoo.models.ffn import FFNS
from memzoo.models.memory import MEMORIES
from memzoo.models.mixers import MIXERS, mixer_options

__all__ = ["LMConfig", "load_config"]

BLOCK_STYLES = ("sequential", "parallel")


def _names(entry) -> list[str]:
    """A pattern entry as the list of mixers it runs: "mamba", "mamba+swa" or [mamba, swa]."""
    if isinstance(entry, str):
        return [name.strip() for name in entry.split("+")]
    if isinstance(entry, (list, tuple)) and entry and all(isinstance(n, str) for n in entry):
        return list(entry)
    raise ValueError(
        f"LMConfig.pattern: each entry must be a mixer name or a list of names, got {entry!r}"
    )


@dataclass
class LMConfig:
    """The architecture of an `LM`.

    d_model, n_layers, vocab_size: widths and depth.
    pattern: mixer names repeated cyclically to n_layers (or exactly n_layers entries); an entry
        "a+b" (or a list [a, b]) runs several mixers side by side in one layer.
    mixer_options: per mixer name, options passed to it (see `memzoo.models.mixers`).
    ffn: "swiglu", "mlp", "moe" or "none"; ffn_options passed to it.
    moe_every: k > 0 makes every k-th layer (k-1, 2k-1, ...) a chunk-level MoE (moe_options).
    memories: [{type: workspace | pkm, layers: [i, ...], **options}]: a memory sub-block after
        the mixer of each listed layer.
    block: "sequential" (pre-norm: x += mixer(norm x); x += ffn(norm x)) or "parallel"
        (Hydra: x += sum_i g_i mixer_i(norm x) + g_f ffn(norm x), learned scalar gates g).
    tie_embeddings: the LM head reuses the embedding matrix.
    """

    d_model: int = 128
    n_layers: int = 2
    vocab_size: int = 256
    pattern: list = field(default_factory=lambda: ["attn"])
    mixer_options: dict = field(default_factory=dict)
    ffn: str = "swiglu"
    ffn_options: dict = field(default_factory=dict)
    moe_every: int = 0
    moe_options: dict = field(default_factory=dict)
    memories: list = field(default_factory=list)
    block: str = "sequential"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        check_field_types(self, "LMConfig")
        for name in ("d_model", "n_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.pattern, (list, tuple)) or not self.pattern:
            raise ValueError(f"LMConfig.pattern must be a non-empty list, got {self.pattern!r}")
        self.pattern = [e if isinstance(e, str) else list(e) for e in self.pattern]
        for entry in self.pattern:
            for name in _names(entry):
                if name not in MIXERS:
                    raise ValueError(
                        f"LMConfig.pattern: unknown mixer {name!r}; valid mixers: "
                        f"{', '.join(sorted(MIXERS))}"
                    )
        for name, options in self.mixer_options.items():
            if name not in MIXERS:
                raise ValueError(
                    f"LMConfig.mixer_options: unknown mixer {name!r}; valid mixers: "
                    f"{', '.join(sorted(MIXERS))}"
                )
            unknown = sorted(set(options) - set(mixer_options(name)))
            if unknown:
                raise ValueError(
                    f"LMConfig.mixer_options[{name!r}]: unknown option(s) {', '.join(unknown)}; "
                    f"valid options: {', '.join(sorted(mixer_options(name)))}"
                )
        if self.ffn != "none" and self.ffn not in FFNS:
            raise ValueError(
                f"LMConfig.ffn: unknown FFN {self.ffn!r}; valid: {', '.join(sorted(FFNS))}, none"
            )
        if not isinstance(self.moe_every, int) or self.moe_every < 0:
            raise ValueError(f"LMConfig.moe_every must be an int >= 0, got {self.moe_every!r}")
        if self.block not in BLOCK_STYLES:
            raise ValueError(
                f"LMConfig.block must be one of {', '.join(BLOCK_STYLES)}, got {self.block!r}"
            )
        for memory in self.memories:
            if not isinstance(memory, dict) or memory.get("type") not in MEMORIES:
                raise ValueError(
                    f"LMConfig.memories: each entry needs type in {', '.join(sorted(MEMORIES))}, "
                    f"got {memory!r}"
                )
            layers = memory.get("layers", [])
            if not layers or any(not 0 <= i < self.n_layers for i in layers):
                raise ValueError(
                    f"LMConfig.memories: layers must list indices in [0, {self.n_layers}), got "
                    f"{layers!r}"
                )

    # ---- the per-layer view ----------------------------------------------------------------

    def layer_mixers(self, i: int) -> list[str]:
        """The mixer names of layer i."""
        if len(self.pattern) == self.n_layers:
            return _names(self.pattern[i])
        return _names(self.pattern[i % len(self.pattern)])

    def layer_ffn(self, i: int) -> tuple[str, dict]:
        """(name, options) of layer i's FFN; name "none" for no FFN."""
        if self.moe_every and (i + 1) % self.moe_every == 0:
            return "moe", dict(self.moe_options)
        return self.ffn, dict(self.ffn_options)

    def layer_memories(self, i: int) -> list[tuple[str, dict]]:
        """(type, options) of each memory sub-block in layer i."""
        found = []
        for memory in self.memories:
            if i in memory["layers"]:
                options = {k: v for k, v in memory.items() if k not in ("type", "layers")}
                found.append((memory["type"], options))
        return found

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LMConfig:
        """Build from a mapping; an unknown key is an error listing the valid ones."""
        if not isinstance(values, dict):
            raise TypeError(f"LMConfig.from_dict: expected a mapping, got {type(values).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(
                f"LMConfig: unknown key(s) {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def load_config(path: str | Path) -> LMConfig:
    """An LMConfig from a YAML or JSON file: its `model:` section, or the whole mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_config: no such config file: {path}")
    values = load_yaml(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"load_config: {path} must hold a mapping, got {type(values).__name__}")
    return LMConfig.from_dict(values.get("model", values))
