"""Passkey retrieval: prompt layout, labels, determinism, scoring against a key-reading oracle,
the length x depth grid and heatmap, the trainer's data, learning above chance, and the CLI."""

from __future__ import annotations

import argparse
import json
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memzoo.eval.cli_eval import add_eval_parsers
from memzoo.eval.passkey import (
    INTRO,
    NUM_DIGITS,
    QUESTION,
    SENTENCES,
    PasskeyConfig,
    PasskeyData,
    evaluate_lengths,
    evaluate_passkey,
    first_number,
    min_seq_len,
    passkey_batch,
    train_passkey,
)
from memzoo.models.config import LMConfig
from memzoo.models.lm import LM
from memzoo.train.checkpoint import save_checkpoint
from memzoo.train.config import RunConfig
from memzoo.train.plot import read_metrics
from memzoo.train.tokenizer import ByteTokenizer, save_tokenizer

ANCHOR = "The pass key is"
NEEDLE_KEY = re.compile(r"The pass key is (\d{5})\.")


class KeyReadingOracle(nn.Module):
    """A byte-level "model" that answers passkey questions by reading its input.

    It finds the needles ("The pass key is DDDDD.") before the question; with at least
    `reads_needed` of them its answer is " " + the first needle's key + ".", otherwise
    " 00000."; after the last "The pass key is" + i characters it predicts the answer's
    character i. With `miss_even_keys`, it writes the third digit of an even key wrong
    (d + 1 mod 10), so the exact-match rate is the share of odd keys and the digit rate
    1 - share of even keys / 5.
    """

    def __init__(self, *, reads_needed: int = 1, miss_even_keys: bool = False):
        super().__init__()
        self.reads_needed, self.miss_even_keys = reads_needed, miss_even_keys
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the evaluators a device

    def _answer(self, text: str) -> str:
        keys = NEEDLE_KEY.findall(text)
        if len(keys) < self.reads_needed:
            return " 00000."
        key = keys[0]
        if self.miss_even_keys and int(key) % 2 == 0:
            key = key[:2] + str((int(key[2]) + 1) % 10) + key[3:]
        return f" {key}."

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, ByteTokenizer.vocab_size)
        for b in range(B):
            text = "".join(chr(t) if t < 256 else "\0" for t in input_ids[b].tolist())
            start = text.rindex(ANCHOR) + len(ANCHOR)  # position t reads text[: t + 1]
            answer = self._answer(text[:start])
            for t in range(start - 1, T):
                typed = text[start : t + 1]
                if len(typed) < len(answer):  # its next character, whatever came before
                    logits[b, t, ord(answer[len(typed)])] = 1.0
        return logits

    def generate(self, input_ids, max_new_tokens, *, greedy=True):
        """Greedy decoding, the only kind the evaluators ask for."""
        for _ in range(max_new_tokens):
            next_token = self(input_ids)[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
        return input_ids


def as_text(ids: torch.Tensor) -> str:
    return bytes(t for t in ids.tolist() if t < 256).decode()


# ---- prompt construction -----------------------------------------------------------------


@pytest.mark.parametrize("filler", ["sentences", "noise"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0], ids=lambda d: f"depth{d}")
def test_key_sits_at_the_requested_depth(filler, depth):
    config = PasskeyConfig(seq_len=600, depth=depth, filler=filler)
    batch = passkey_batch(config, 6, seed=1)
    n = config.filler_len
    # noise puts the key at the nearest byte; sentences at the nearest sentence boundary, at
    # most half a sentence (and the spaces before it) away
    tolerance = 0.5 / n if filler == "noise" else (max(map(len, SENTENCES)) + 4) / 2 / n
    assert torch.all((batch.depths - depth).abs() <= tolerance + 1e-12)
    offset = 1 + len(INTRO) + len(" The pass key is ")
    expected_positions = offset + torch.round(batch.depths * n).long()
    assert torch.equal(batch.key_positions, expected_positions)
    for row, key, at in zip(batch.input_ids, batch.keys, batch.key_positions, strict=True):
        assert as_text(row[at : at + NUM_DIGITS]) == str(int(key))
        assert as_text(row[at - len(ANCHOR) - 1 : at]) == ANCHOR + " "
        if filler == "sentences":  # the needle starts right after a sentence's full stop
            assert as_text(row[at - len(ANCHOR) - 3 : at - len(ANCHOR) - 1]) == ". "


@pytest.mark.parametrize("seq_len", [min_seq_len(), 300, 1000], ids=lambda n: f"T{n}")
def test_prompt_reads_intro_filler_needle_question(seq_len):
    batch = passkey_batch(PasskeyConfig(seq_len=seq_len), 4, seed=0)
    assert batch.input_ids.shape == (4, seq_len)
    assert batch.input_ids.dtype == torch.int64
    assert torch.all(batch.input_ids[:, 0] == ByteTokenizer.eos_id)
    assert torch.all(batch.input_ids[:, 1:] < 256)
    for row, prompt, key in zip(batch.input_ids, batch.prompts(), batch.keys, strict=True):
        text = as_text(row)
        assert text.startswith(INTRO)
        assert text.count(QUESTION) == 1
        key = str(int(key))
        assert NEEDLE_KEY.findall(text) == [key]
        assert text.endswith(QUESTION + " " + key[:4])
        assert prompt == text[:-NUM_DIGITS] and prompt.endswith(ANCHOR)


def test_labels_are_the_key_digits_only():
    batch = passkey_batch(PasskeyConfig(seq_len=400), 5, seed=3)
    T = batch.input_ids.shape[1]
    labeled = batch.labels != -100
    assert labeled[:, T - NUM_DIGITS :].all() and not labeled[:, : T - NUM_DIGITS].any()
    for labels, key in zip(batch.labels, batch.keys, strict=True):
        assert as_text(labels[T - NUM_DIGITS :]) == str(int(key))
    # labels are the inputs shifted by one
    assert torch.equal(batch.labels[:, T - NUM_DIGITS : T - 1], batch.input_ids[:, T - 4 :])
    assert torch.all((batch.keys >= 10_000) & (batch.keys <= 99_999))


def test_examples_are_a_pure_function_of_the_seed():
    config = PasskeyConfig(seq_len=500, filler="noise")
    a, b = passkey_batch(config, 8, seed=(4, 2)), passkey_batch(config, 8, seed=(4, 2))
    c = passkey_batch(config, 8, seed=(4, 3))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.keys, c.keys)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": min_seq_len() - 1}, "seq_len must be an int >= 249"),
        ({"depth": 1.5}, "depth must lie in"),
        ({"filler": "lorem"}, "filler must be one of"),
        ({"num_passes": 0}, "num_passes must be an int >= 1"),
    ],
    ids=["short", "depth", "filler", "passes"],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PasskeyConfig(**kwargs)


# ---- scoring -----------------------------------------------------------------------------


def test_first_number():
    assert first_number(" 71432. Remember") == "71432"
    assert first_number("key: 12 then 345") == "12"
    assert first_number("no digits") is None


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_scores_match_a_key_reading_oracle(mode):
    config = PasskeyConfig(seq_len=300)
    keys = passkey_batch(config, 24, seed=7).keys
    even = (keys % 2 == 0).float().mean().item()
    oracle = KeyReadingOracle(miss_even_keys=True)
    score = evaluate_passkey(oracle, config, num_examples=24, seed=7, batch_size=5, mode=mode)
    assert 0 < even < 1
    assert score.exact_match == pytest.approx(1 - even)
    assert score.digit_accuracy == pytest.approx(1 - even / NUM_DIGITS)
    assert score.num_examples == 24


def test_teacher_forcing_refuses_a_non_byte_tokenizer():
    bpe = SimpleNamespace(name="bpe")
    with pytest.raises(ValueError, match="needs the byte tokenizer, got a bpe one"):
        evaluate_passkey(KeyReadingOracle(), PasskeyConfig(seq_len=260), tokenizer=bpe)


def test_grid_and_heatmap(tmp_path):
    from memzoo.eval.passkey import write_passkey_results

    grid = evaluate_lengths(
        KeyReadingOracle(), [260, 520], [0.0, 1.0], num_examples=3, batch_size=3
    )
    assert grid.exact_match.shape == (2, 2) and (grid.exact_match == 1.0).all()
    assert grid.by_length() == {260: 1.0, 520: 1.0}
    path = write_passkey_results(grid, tmp_path, "oracle")
    saved = json.loads(path.read_text())
    assert saved["lengths"] == [260, 520] and saved["exact_match"] == [[1.0, 1.0], [1.0, 1.0]]
    assert (tmp_path / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passkey.json", "passkey.png"]


# ---- training ----------------------------------------------------------------------------


def test_training_data_is_sharded_by_rank_and_checked_on_resume():
    config = PasskeyConfig(seq_len=260)
    data = PasskeyData(config, global_batch=4, seed=5, eval_examples=5)
    whole = data.batch(3)
    halves = [data.batch(3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), whole["input_ids"])
    assert torch.equal(data.batch(3)["labels"], whole["labels"])
    assert not torch.equal(data.batch(4)["input_ids"], whole["input_ids"])
    assert [b["input_ids"].shape[0] for b in data.eval_batches(2)] == [2, 2, 1]
    other = PasskeyData(PasskeyConfig(seq_len=300), global_batch=4, seed=5)
    with pytest.raises(ValueError, match="trained on"):
        data.load_state_dict(other.state_dict())


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from a second thread, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_transformer_learns_passkey_above_chance(tmp_path, one_thread):
    """120 steps of a 2-layer attention model at L=260: digit accuracy far above chance
    (0.1); measured 0.52 on the trainer's 64 evaluation examples, 0.47 on 16 at depth 0.5."""
    config = RunConfig.from_dict(
        {
            "model": {
                "d_model": 64,
                "n_layers": 2,
                "pattern": ["attn"],
                "mixer_options": {"attn": {"num_heads": 2}},
                "ffn": "none",
            },
            "train": {
                "steps": 120,
                "global_batch": 8,
                "lr": 5e-3,
                "warmup": 20,
                "log_every": 40,
                "eval_every": 120,
                "eval_batches": 1,
                "save_every": 120,
                "sample_tokens": 0,
                "progress": False,
                "out_dir": str(tmp_path / "run"),
            },
        }
    )
    result, grid = train_passkey(
        config, PasskeyConfig(seq_len=260), lengths=[260], depths=[0.5], num_examples=16
    )
    final = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert final[-1]["passkey_digits"] > 0.3
    assert grid.digit_accuracy[0, 0] > 0.3
    assert (result.run_dir / "passkey.png").is_file()
    assert config.data.seq_len == 260


# ---- the command -------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="memzoo")
    add_eval_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def make_checkpoint(run_dir, seq_len=256):
    """A step-1 checkpoint of an untrained byte-level LM, as `memzoo train` writes it."""
    torch.manual_seed(0)
    model_config = LMConfig(
        d_model=32, n_layers=1, vocab_size=260, pattern=["attn"], ffn="none",
        mixer_options={"attn": {"num_heads": 2}},
    )  # fmt: skip
    save_checkpoint(
        run_dir,
        1,
        model_state=LM(model_config).state_dict(),
        train_state={},
        config={"model": model_config.to_dict(), "data": {"seq_len": seq_len}},
        write_tokenizer=lambda d: save_tokenizer(ByteTokenizer(), d),
        keep_last=1,
    )
    return model_config


def test_cli_zero_shot_writes_grid_and_heatmap(tmp_path, capsys):
    make_checkpoint(tmp_path / "run")
    argv = ["eval", "passkey", "--checkpoint", str(tmp_path / "run"), "--lengths", "260"]
    assert run_cli([*argv, "--depths", "0.5", "--examples", "2"]) == 0
    saved = json.loads((tmp_path / "run" / "passkey.json").read_text())
    assert saved["lengths"] == [260] and saved["depths"] == [0.5]
    assert saved["mode"] == "generate" and saved["num_examples"] == 2
    assert (tmp_path / "run" / "passkey.png").is_file()
    assert "passkey exact match" in capsys.readouterr().out


def test_cli_reports_a_bad_length(tmp_path, capsys):
    make_checkpoint(tmp_path / "run")
    argv = ["eval", "passkey", "--checkpoint", str(tmp_path / "run"), "--lengths", "100"]
    assert run_cli(argv) == 1
    assert "seq_len must be an int >= 249" in capsys.readouterr().err


def test_cli_trains_a_preset_then_evaluates(tmp_path, one_thread):
    out = tmp_path / "run"
    argv = ["eval", "passkey", "--train", "configs/transformer-tiny.yaml", "--length", "260"]
    overrides = ["train.steps=2", "train.global_batch=2", f"train.out_dir={out}"]
    options = ["--lengths", "260", "--depths", "0.5", "--examples", "2"]
    assert (
        run_cli([*argv, *options, *overrides, "train.eval_batches=1", "train.progress=false"]) == 0
    )
    saved = json.loads((out / "passkey.json").read_text())
    assert saved["train_length"] == 260 and saved["lengths"] == [260]
    assert (out / "checkpoints" / "step_00000002" / "tokenizer.json").is_file()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert {"passkey_exact", "passkey_digits", "eval_loss"} <= set(evals[-1])
