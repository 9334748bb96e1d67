"""Load a trained LM back from a `memzoo train` run: weights, config and tokenizer.

    model, tokenizer, config = load_trained_lm("runs/mamba-tiny")        # newest checkpoint
    model, tokenizer, config = load_trained_lm("runs/mamba-tiny/checkpoints/step_000500")

Nothing from the checkpoint is executed: weights come from safetensors and the config from
YAML (memzoo.train.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from memzoo.models.config import LMConfig
from memzoo.models.lm import LM
from memzoo.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from memzoo.train.tokenizer import load_tokenizer

__all__ = ["load_trained_lm"]


def load_trained_lm(path: str | Path, *, device=None):
    """(LM in eval mode, tokenizer, run config dict) of a training run.

    path: a run directory (its newest checkpoint is used) or one checkpoint directory.
    device: where the weights go (default: CUDA when present, else the CPU).
    """
    path = Path(path)
    checkpoint = path if (path / "model.safetensors").is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint directory (model.safetensors) nor a run directory "
            "with checkpoints/step_*"
        )
    model_state, _, config = load_checkpoint(checkpoint)
    model = LM(LMConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(model_state)
    except RuntimeError as error:  # missing, unexpected or misshapen weights
        raise CheckpointError(
            f"{checkpoint}: the weights do not fit its config: {error}"
        ) from error
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    return model.to(device).eval(), tokenizer, config
