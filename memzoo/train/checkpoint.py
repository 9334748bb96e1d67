"""Checkpoints in a run directory, written atomically and loaded without executing code.

    <run_dir>/checkpoints/step_00000200/
        model.safetensors   the weights (safetensors)
        state.pt            step, optimizer state, RNG states, data position
                            (torch.load(weights_only=True): tensors and plain containers only)
        config.yaml         the run config that produced it
        tokenizer.json      the tokenizer

A checkpoint is first written to a hidden temporary directory and then renamed into place, so
a crash mid-save leaves the previous checkpoints untouched and never a half-written one under
a real name. The newest `keep_last` are kept.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from memzoo._config import load_yaml

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not belong to this run."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: dict[str, Any],
    write_tokenizer,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`.

    model_state: the full (unsharded) state dict; train_state: step, optimizer, RNG, data
    position (tensors and plain containers); write_tokenizer(directory) saves the tokenizer.
    """
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save({**train_state, "step": step}, tmp / "state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_tokenizer(tmp)
        if final.exists():  # the same step saved again (e.g. an interrupted run resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(model state, train state, run config dict) of a checkpoint directory.

    Raises CheckpointError naming the file for anything missing or unreadable.
    """
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("model.safetensors", "state.pt", "config.yaml"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        model_state = load_file(str(path / "model.safetensors"))
    except Exception as error:
        raise CheckpointError(f"cannot read {path / 'model.safetensors'}: {error}") from error
    try:
        train_state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path / 'state.pt'}: {error}") from error
    try:
        config = load_yaml((path / "config.yaml").read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"cannot read {path / 'config.yaml'}: {error}") from error
    return model_state, train_state, config
