"""RunConfig: a training run's model, data and optimisation settings, from YAML + overrides.

A run config is one YAML file with three sections (any may be left out to take the defaults)::

    model: {d_model: 128, n_layers: 4, pattern: [attn], ...}     # memzoo.models.LMConfig
    data:  {source: builtin, tokenizer: byte, seq_len: 256}
    train: {steps: 1000, global_batch: 16, lr: 3e-3, ...}

and command-line overrides `section.key=value` (values parsed as YAML: `train.lr=1e-3`,
`model.pattern=[mamba,swa]`). Unknown sections or keys are errors listing the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memzoo._config import check_field_types, load_yaml
from memzoo.models.config import LMConfig

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "apply_overrides", "load_run_config"]


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut.

    source: "builtin" (Python's own documentation, no download), a text file or directory,
        a .jsonl file (`text_field`), a pre-tokenized .bin/.npy token file, or "hf:<path>" (a
        datasets.save_to_disk directory).
    tokenizer: "byte" (the default; 260 ids), "bpe" (trained on the source, `vocab_size`
        ids) or a path to a tokenizer.json. model.vocab_size is set from it.
    seq_len: tokens per training sequence; varlen: documents never attend to each other.
    heldout: fraction of the token stream kept for evaluation.
    """

    source: str = "builtin"
    text_field: str = "text"
    tokenizer: str = "byte"
    vocab_size: int | None = None
    seq_len: int = 256
    varlen: bool = False
    heldout: float = 0.02


@dataclass
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing.

    global_batch: sequences per optimizer step over all processes; micro_batch: sequences per
    forward/backward per process (default: the whole per-process share); gradients are
    accumulated over global_batch / (micro_batch * world_size) micro-steps.
    lr follows a linear warmup over `warmup` steps then a cosine decay to lr * min_lr_ratio.
    Every `eval_every` steps (and at the end) the held-out loss is measured and, when
    sample_tokens > 0, a sample of that many tokens is generated.
    """

    steps: int = 1000
    global_batch: int = 16
    micro_batch: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    seed: int = 0
    compile: bool = False
    distributed: str = "ddp"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    sample_tokens: int = 64
    save_every: int = 200
    keep_last: int = 3
    out_dir: str = "runs/default"
    progress: bool = True


_SECTIONS = {"model": LMConfig, "data": DataConfig, "train": TrainConfig}


def _build(cls, values: dict[str, Any], section: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {section!r} must be a mapping, got {values!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"config section {section!r}: unknown key(s) {', '.join(unknown)}; valid keys: "
            f"{', '.join(sorted(valid))}"
        )
    built = cls(**values)
    if section != "model":  # LMConfig checks itself
        check_field_types(built, section)
    return built


@dataclass
class RunConfig:
    model: LMConfig
    data: DataConfig
    train: TrainConfig

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(_SECTIONS))
        if unknown:
            raise ValueError(
                f"run config: unknown section(s) {', '.join(unknown)}; valid sections: "
                f"{', '.join(_SECTIONS)}"
            )
        return cls(**{k: _build(c, values.get(k, {}), k) for k, c in _SECTIONS.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(getattr(self, k)) for k in _SECTIONS}

    def validate(self) -> None:
        """Checks that need the whole config (positive sizes, batch divisibility)."""
        t, d = self.train, self.data
        for name in ("steps", "global_batch", "log_every", "keep_last"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if d.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {d.seq_len}")
        if not 0 <= d.heldout < 1:
            raise ValueError(f"data.heldout must lie in [0, 1), got {d.heldout}")
        if t.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"train.distributed must be ddp or fsdp, got {t.distributed!r}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (YAML-parsed values) to a raw config mapping."""
    values = {k: dict(v or {}) for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.key=value (train.lr=1e-3)")
        if section not in _SECTIONS:
            raise ValueError(
                f"override {item!r}: unknown section {section!r}; valid: {', '.join(_SECTIONS)}"
            )
        values.setdefault(section, {})[name] = load_yaml(raw)
    return values


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config (None: all defaults), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        values = load_yaml(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping with model/data/train sections")
    config = RunConfig.from_dict(apply_overrides(values, list(overrides)))
    config.validate()
    return config
