"""The MQAR runner, the sweep (results, resume, skipped mixers, table, plot), the Pareto
frontier and the `memzoo sweep mqar` parser."""

from __future__ import annotations

import argparse
import json

import pytest

from memzoo.eval import sweep as sweep_module
from memzoo.eval.cli_sweep import PRESET_NAMES, add_sweep_parser, run_mqar_sweep
from memzoo.eval.mqar import MQARConfig
from memzoo.eval.plots import pareto_frontier
from memzoo.eval.runner import (
    MQARModel,
    MQARResult,
    MQARTask,
    best_result,
    run_mqar,
    sweep_learning_rates,
)
from memzoo.eval.sweep import (
    PRESETS,
    MixerSetting,
    SweepPreset,
    best_per_model,
    read_results,
    run_sweep,
    write_table,
)
from memzoo.models.lm import LM
from memzoo.models.mixers import MIXERS, build_mixer, mixer_class


def test_runner_trains_attention_to_recall_an_easy_slice(tmp_path):
    easy = dict(vocab_size=16, seq_len=16, num_kv_pairs=2)
    task = MQARTask(
        train=[MQARConfig(**easy, num_examples=2048)],
        test=[MQARConfig(**easy, num_examples=128)],
        batch_size=64,
        epochs=4,
        eval_every=16,
        stop_accuracy=0.95,
    )
    model = MQARModel("attn", 64, short_conv=True)
    result = run_mqar(model, task, 3e-3, tmp_path / "run", device="cpu")
    assert result.accuracy >= 0.9, result
    assert result.slice_accuracy == {"T16-kv2": result.accuracy}
    # attn: keys and values of every token, 2 * d * T per layer; the short conv: 2 d floats.
    assert result.state_size == {"T16-kv2": 2 * (2 * 64 * 16 + 2 * 64)}
    assert result.params == LM(model.lm_config(16)).num_params()
    # JRT: "once" repeats the final evaluation on the same examples; "twice" is a probability.
    jrt = result.jrt["T16-kv2"]
    assert jrt.single == pytest.approx(result.accuracy) and 0.0 <= jrt.repeated <= 1.0


def test_learning_rate_sweep_runs_each_lr_in_its_own_directory(tmp_path):
    task = _micro().task
    results = sweep_learning_rates(MQARModel("short_conv", 16), task, [1e-3, 3e-3], tmp_path)
    assert [(r.mixer, r.lr, r.steps) for r in results] == [
        ("short_conv", 1e-3, 2),
        ("short_conv", 3e-3, 2),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr1.0e-03", "lr3.0e-03"]
    assert all(0 <= r.accuracy <= 1 for r in results)


def test_best_result_prefers_accuracy_then_the_smaller_lr():
    def result(lr, accuracy):
        return MQARResult("attn", 32, lr, accuracy, {}, {}, 0, 0, 0.0, False)

    runs = [result(1e-3, 0.5), result(3e-3, 0.9), result(1e-2, 0.9)]
    assert best_result(runs).lr == 3e-3


def _micro(epochs: float = 1.0) -> SweepPreset:
    slice_ = dict(vocab_size=16, seq_len=16, num_kv_pairs=2)
    task = MQARTask(
        train=[MQARConfig(**slice_, num_examples=64)],
        test=[MQARConfig(**slice_, num_examples=16), MQARConfig(16, 24, 4, num_examples=16)],
        batch_size=32,
        epochs=epochs,
        eval_every=2,
    )
    mixers = {"attn": MixerSetting({"num_heads": 2}, short_conv=True)}
    return SweepPreset("micro", task, widths=(16,), lrs=(1e-3,), mixers=mixers)


def test_micro_sweep_writes_results_table_and_plot_then_skips_finished_runs(tmp_path, monkeypatch):
    lines = []
    rows = run_sweep(_micro(), tmp_path, mixers=["attn", "short_conv"], log=lines.append)
    assert [(r["mixer"], r["slice"]) for r in rows] == [
        ("attn", "T16-kv2"),
        ("attn", "T24-kv4"),
        ("short_conv", "T16-kv2"),
        ("short_conv", "T24-kv4"),
    ]
    assert read_results(tmp_path / "results.csv") == rows
    assert all(0.0 <= r["accuracy_twice"] <= 1.0 for r in rows)
    attn = rows[1]
    assert attn["model"] == "short_conv+attn(num_heads=2)"
    assert attn["state_size"] == 2 * (2 * 16 * 24 + 2 * 16) and attn["steps"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| attn | `short_conv+attn(num_heads=2)` | 16 |" in table
    assert "| short_conv | `short_conv` | 16 |" in table
    assert (tmp_path / "recall_vs_state.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("attn         d=16   lr=1.0e-03  accuracy") for line in lines)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep_module, "run_mqar", no_training)
    lines.clear()
    again = run_sweep(_micro(), tmp_path, mixers=["attn", "short_conv"], log=lines.append)
    assert again == rows
    assert sum("done before, skipped" in line for line in lines) == 2


def test_a_sweep_with_other_settings_refuses_the_directory(tmp_path):
    run_sweep(_micro(), tmp_path, mixers=["short_conv"], log=lambda _: None)
    with pytest.raises(ValueError, match="holds a sweep with other settings"):
        run_sweep(_micro(epochs=2.0), tmp_path, mixers=["short_conv"], log=lambda _: None)


def test_a_mixer_whose_module_does_not_import_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(MIXERS, "ghost", "ghost_layer:Ghost")
    lines = []
    assert run_sweep(_micro(), tmp_path, mixers=["ghost"], log=lines.append) == []
    assert lines[0].startswith("skip ghost: its module does not import yet")
    assert not (tmp_path / "results.csv").exists()


def test_unknown_mixer_names_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown mixer\\(s\\) nope"):
        run_sweep(_micro(), tmp_path, mixers=["nope"], log=lambda _: None)


def _row(mixer, width, lr, slice_, accuracy, state, twice=None):
    return {
        "mixer": mixer,
        "model": mixer,
        "d_model": width,
        "lr": lr,
        "slice": slice_,
        "seq_len": int(slice_[1:].split("-")[0]),
        "num_kv_pairs": 4,
        "accuracy": accuracy,
        "accuracy_twice": twice,
        "state_size": state,
        "params": 1000,
        "steps": 10,
        "seconds": 2.0,
        "stopped_early": False,
    }


def test_best_per_model_takes_the_lr_with_the_best_mean_accuracy_over_slices(tmp_path):
    rows = [
        _row("attn", 32, 1e-3, "T64-kv4", 0.9, 4096),
        _row("attn", 32, 1e-3, "T128-kv8", 0.3, 8192),
        _row("attn", 32, 3e-3, "T64-kv4", 0.7, 4096, twice=0.8),
        _row("attn", 32, 3e-3, "T128-kv8", 0.7, 8192, twice=0.9),
        _row("based", 32, 1e-3, "T64-kv4", 0.5, 9000),
        _row("based", 32, 1e-3, "T128-kv8", 0.4, 9000),
    ]
    attn, based = best_per_model(rows)
    assert attn["lr"] == 3e-3 and attn["accuracy"] == {"T64-kv4": 0.7, "T128-kv8": 0.7}
    assert attn["state_size"] == {"T64-kv4": 4096, "T128-kv8": 8192}
    assert attn["seconds"] == 4.0 and based["mean_accuracy"] == pytest.approx(0.45)
    assert attn["jrt_gain"] == pytest.approx(0.15) and based["jrt_gain"] is None
    table = write_table(rows, tmp_path / "t.md", title="demo")
    assert table.splitlines()[2] == (
        "| mixer | block | d_model | params | state @T=64 | state @T=128 | lr | T64-kv4 | "
        "T128-kv8 | mean | JRT gain | time (s) |"
    )
    assert table.splitlines()[4] == (
        "| attn | `attn` | 32 | 1,000 | 4,096 | 8,192 | 3.0e-03 | 0.700 | 0.700 | 0.700 | +0.150 "
        "| 4 |"
    )
    assert table.splitlines()[5].endswith("| 0.450 |  | 2 |")


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param([(1, 0.1), (2, 0.5), (3, 0.4), (4, 0.9), (5, 0.9)], [0, 1, 3], id="staircase"),
        pytest.param([(10, 0.2), (1, 0.8), (5, 0.6)], [1], id="smallest-is-best"),
        pytest.param([(2, 0.5), (2, 0.7), (1, 0.5), (2, 0.7)], [2, 1], id="ties"),
        pytest.param([], [], id="empty"),
    ],
)
def test_pareto_frontier(points, expected):
    assert pareto_frontier(points) == expected


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_settings_build_every_importable_mixer_at_every_width(name):
    preset = PRESETS[name]()
    assert preset.name == name
    for mixer in MIXERS:
        try:
            mixer_class(mixer)
        except ImportError:
            continue
        for width in preset.widths:
            model = preset.model(mixer, width)
            model.lm_config(preset.task.vocab_size)
            build_mixer(mixer, width, **model.mixer_options)


def test_cli_registers_sweep_mqar():
    parser = argparse.ArgumentParser(prog="memzoo")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", "mqar", "--preset", "paper", "--mixers", "attn", "based"])
    assert args.run is run_mqar_sweep
    assert (args.preset, args.mixers, args.out) == ("paper", ["attn", "based"], None)
    assert set(PRESET_NAMES) == set(PRESETS)
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "mqar", "--preset", "huge"])


def test_cli_runs_a_preset_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "quick", _micro)
    parser = argparse.ArgumentParser(prog="memzoo")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["sweep", "mqar", "--mixers", "short_conv", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "short_conv   d=16   lr=1.0e-03  accuracy" in out
    assert "| short_conv | `short_conv` | 16 |" in out
    args = parser.parse_args([*argv, "--threads", "0"])
    assert args.run(args) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_settings_record_is_json(tmp_path):
    run_sweep(_micro(), tmp_path, mixers=[], log=lambda _: None)
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    assert recorded["preset"] == "micro"
    assert recorded["task"]["test"][1]["num_kv_pairs"] == 4
