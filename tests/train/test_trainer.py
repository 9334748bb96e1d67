"""The training loop: learning, exact resume, faults, checkpoints, accumulation, varlen."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from memzoo.models.mixers.mamba import Mamba
from memzoo.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from memzoo.train.config import RunConfig, load_run_config
from memzoo.train.plot import read_metrics
from memzoo.train.trainer import (
    Trainer,
    TrainingDiverged,
    learning_rate,
    no_decay_names,
    param_groups,
)


def make_config(tmp_path, name="run", **train):
    values = {
        "model": {
            "d_model": 32,
            "n_layers": 2,
            "pattern": ["short_conv", "attn"],
            "mixer_options": {"attn": {"num_heads": 2}},
        },
        "data": {"source": "builtin", "seq_len": 32, "heldout": 0.05},
        "train": {
            "steps": 8,
            "global_batch": 4,
            "lr": 3e-3,
            "warmup": 2,
            "log_every": 1,
            "eval_every": 4,
            "eval_batches": 2,
            "save_every": 4,
            "keep_last": 5,
            "sample_tokens": 8,
            "progress": False,
            "out_dir": str(tmp_path / name),
            **train,
        },
    }
    config = RunConfig.from_dict(values)
    config.validate()
    return config


def train_losses(run_dir) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["kind"] == "train"
    }


def test_learning_rate_schedule():
    cfg = make_config(Path("/tmp")).train
    cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr_ratio = 100, 10, 1.0, 0.1
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_embeddings_and_ssm_parameters():
    from memzoo.models.config import LMConfig
    from memzoo.models.lm import LM

    model = LM(LMConfig(d_model=32, n_layers=1, pattern=["mamba"], ffn="none"))
    decay, no_decay = param_groups(model, 0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    mamba = model.blocks[0].mixers[0]
    assert isinstance(mamba, Mamba)
    for p in (model.embed.weight, model.norm.weight, mamba.A_log, mamba.D):
        assert id(p) in no_decay_ids
    assert id(mamba.in_proj.weight) in {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_no_decay_names_outlive_the_parameters_they_name():
    """FSDP's fully_shard puts new parameters, without `_no_weight_decay`, in place of the old:
    names read before the swap still keep A_log out of weight decay."""
    from memzoo.models.config import LMConfig
    from memzoo.models.lm import LM

    model = LM(LMConfig(d_model=32, n_layers=1, pattern=["mamba"], ffn="none"))
    names = no_decay_names(model)
    mamba = model.blocks[0].mixers[0]
    assert "blocks.0.mixers.0.A_log" in names and mamba.A_log.dim() == 2
    mamba.A_log = torch.nn.Parameter(mamba.A_log.detach().clone())  # unmarked, as FSDP's
    _, after_swap = param_groups(model, 0.1)
    assert id(mamba.A_log) not in {id(p) for p in after_swap["params"]}  # what went wrong
    _, kept = param_groups(model, 0.1, names)
    assert id(mamba.A_log) in {id(p) for p in kept["params"]}


def test_run_writes_metrics_checkpoints_samples_and_plot(tmp_path):
    result = Trainer(make_config(tmp_path)).run()
    run = tmp_path / "run"
    assert result.step == 8 and math.isfinite(result.loss) and result.eval_loss is not None
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    records = read_metrics(run / "metrics.jsonl")
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "eval", "sample"}
    assert sorted(train_losses(run)) == list(range(1, 9))
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
    # The optimizer / RNG / data file loads without unpickling code.
    state = torch.load(latest_checkpoint(run) / "state.pt", weights_only=True)
    assert state["step"] == 8 and "optimizer" in state and "data" in state


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    Trainer(make_config(tmp_path, "full")).run()
    full = train_losses(tmp_path / "full")
    # A run that stopped after step 4: its directory as it was then.
    half = tmp_path / "half"
    (half / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step_00000004", half / "checkpoints/step_00000004")
    shutil.copy(tmp_path / "full/config.yaml", half / "config.yaml")
    result = Trainer(make_config(tmp_path, "half"), resume=half).run()
    assert result.step == 8
    resumed = train_losses(half)
    assert list(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


def test_sigint_saves_a_checkpoint_and_stops(tmp_path):
    trainer = Trainer(make_config(tmp_path, save_every=100, eval_every=100))
    step = trainer._step

    def step_then_interrupt(i):
        out = step(i)
        if i == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    trainer._step = step_then_interrupt
    result = trainer.run()
    assert result.interrupted and result.step == 3
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(make_config(tmp_path, steps=10))
    forward = trainer.forward
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = forward(*args, **kwargs)
        return loss * float("nan") if len(calls) > 6 and kwargs.get("labels") is not None else loss

    trainer.forward = poisoned
    with pytest.raises(TrainingDiverged, match="step_00000004"):
        trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(make_config(tmp_path, steps=8))
    import memzoo.train.checkpoint as checkpoint

    real = checkpoint.torch.save
    saves = []

    def crash_on_second(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError("disk full")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    root = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert Trainer(make_config(tmp_path), resume=tmp_path / "run").start_step == 4


def test_bad_resumes_are_clear_errors(tmp_path):
    Trainer(make_config(tmp_path, steps=4)).run()
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(make_config(tmp_path, steps=4))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Trainer(make_config(tmp_path), resume=tmp_path / "elsewhere")
    other = make_config(tmp_path)
    other.model.d_model = 48
    with pytest.raises(CheckpointError, match="model config differs.*d_model"):
        Trainer(other, resume=run)
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        Trainer(make_config(tmp_path), resume=run)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    Trainer(make_config(tmp_path, "big", steps=3)).run()
    Trainer(make_config(tmp_path, "acc", steps=3, micro_batch=1)).run()
    big, acc = train_losses(tmp_path / "big"), train_losses(tmp_path / "acc")
    assert all(abs(big[s] - acc[s]) < 1e-5 for s in big), (big, acc)


def test_varlen_batches_train(tmp_path):
    config = make_config(tmp_path, steps=3, micro_batch=2)
    config.data.varlen = True
    result = Trainer(config).run()
    assert math.isfinite(result.loss)


def test_loss_falls_on_the_builtin_corpus(tmp_path):
    config = make_config(
        tmp_path,
        steps=150,
        global_batch=8,
        lr=1e-2,
        warmup=10,
        log_every=10,
        eval_every=150,
        save_every=150,
        sample_tokens=0,
    )
    Trainer(config).run()
    losses = train_losses(tmp_path / "run")
    assert losses[10] > 4.0  # near ln(260) = 5.56 at the start
    assert losses[150] < 2.8, losses  # byte-level text: bigram statistics and beyond


def test_cli_train_and_overrides(tmp_path, capsys):
    from memzoo.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(make_config(tmp_path).to_dict()))
    code = main(
        [
            "train",
            "--config",
            str(config),
            "train.steps=2",
            "train.save_every=2",
            f"train.out_dir={tmp_path / 'cli'}",
        ]
    )
    assert code == 0
    assert "done: step 2" in capsys.readouterr().out
    assert load_run_config(tmp_path / "cli/config.yaml").train.steps == 2
    code = main(["train", "--config", str(config), "train.stpes=2"])
    assert code == 1 and "unknown key(s) stpes" in capsys.readouterr().err
