"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memzoo.train.checkpoint import latest_checkpoint, load_checkpoint
from memzoo.train.plot import read_metrics

CONFIG = {
    "model": {
        "d_model": 32,
        "n_layers": 2,
        "pattern": ["short_conv", "attn"],
        "mixer_options": {"attn": {"num_heads": 2}},
    },
    "data": {"source": "builtin", "seq_len": 32, "heldout": 0.05},
    "train": {
        "steps": 3,
        "global_batch": 4,
        "log_every": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "save_every": 3,
        "sample_tokens": 4,
        "progress": False,
    },
}


# MemMamba with cross-layer reads: layer 1 reads layer 0's note pool, so a gradient crosses from
# one wrapped block into another's parameters outside the blocks' own inputs and outputs. Its
# Mamba blocks also hold a matrix kept out of weight decay (A_log `[Dm, N]`), whose mark
# fully_shard's new parameters do not carry (see `no_decay_names`).
MEMMAMBA = {
    "d_model": 32,
    "n_layers": 2,
    "pattern": ["memmamba"],
    "mixer_options": {
        "memmamba": {
            "ssm_options": {"d_state": 8},
            "note_dim": 16,
            "pool_size": 4,
            "cross_layer_every": 2,
        }
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, name: str, processes: int, *overrides: str, model=None) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "model": model or CONFIG["model"]}))
    out = tmp_path / name
    command = ["-m", "memzoo.cli", "train", "--config", str(config), f"train.out_dir={out}"]
    if processes > 1:
        launcher = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
        ]
        command = launcher + command
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, *command, *overrides], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def losses(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind}


@pytest.mark.parametrize(
    "strategy, model",
    [("ddp", None), ("fsdp", None), ("ddp", MEMMAMBA), ("fsdp", MEMMAMBA)],
    ids=["ddp", "fsdp", "ddp-memmamba-cross-layer", "fsdp-memmamba-cross-layer"],
)
def test_two_processes_match_one(tmp_path, strategy, model):
    one = run(tmp_path, "one", 1, model=model)
    two = run(tmp_path, "two", 2, f"train.distributed={strategy}", model=model)
    a, b = losses(one, "train", "loss"), losses(two, "train", "loss")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    ea, eb = losses(one, "eval", "eval_loss"), losses(two, "eval", "eval_loss")
    assert abs(ea[3] - eb[3]) <= 1e-5
    # One full checkpoint, written by rank 0 alone, loadable by a single process.
    state, train_state, _ = load_checkpoint(latest_checkpoint(two))
    reference, _, _ = load_checkpoint(latest_checkpoint(one))
    assert state.keys() == reference.keys()
    assert all((state[k] - reference[k]).abs().max() <= 1e-5 for k in state)
    assert train_state["step"] == 3
