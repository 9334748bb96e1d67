"""The lm-eval adapter: request handling against direct LM.forward computations, the offline
task data, and one lm-eval run end to end (skipped where lm-eval is not installed)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from memzoo.eval.lm_eval import MemzooLM, evaluate_tasks
from memzoo.eval.passkey import QUESTION
from memzoo.eval.tasks import TASK_FILES, write_task_data
from memzoo.eval.tasks.data import load_task_data
from memzoo.models.config import LMConfig
from memzoo.models.lm import LM
from memzoo.train.pretrained import load_trained_lm
from memzoo.train.tokenizer import ByteTokenizer
from tests.eval.test_passkey import KeyReadingOracle, make_checkpoint, run_cli

EOS = ByteTokenizer.eos_id


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LMConfig(
        d_model=32, n_layers=2, vocab_size=260, pattern=["attn"], ffn="none",
        mixer_options={"attn": {"num_heads": 2}}, init_std=0.5,
    )  # fmt: skip
    return LM(config).eval()


def request(*args):
    """What lm-eval hands a model: an object whose `.args` holds the request's arguments."""
    return SimpleNamespace(args=args)


@torch.no_grad()
def direct_logprob(model, ids: list[int], scored: int) -> float:
    """Sum of log_softmax(LM.forward) at the last `scored` tokens of `ids`, one sequence."""
    x = torch.tensor([ids])
    logprobs = torch.log_softmax(model(x[:, :-1]).double(), dim=-1)[0]
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(ids) - scored, len(ids)))


PAIRS = [
    ("The grass is", " green."),
    ("The sky is", " blue."),  # the same length as the next pair: they share a batch
    ("Here we ", "go again"),
    ("", "hello"),
    ("x", "y"),
]


def test_loglikelihood_equals_log_softmax_sums_of_forward(model):
    results = MemzooLM(model, ByteTokenizer(), batch_size=3).loglikelihood(
        [request(c, x) for c, x in PAIRS]
    )
    for (context, continuation), (logprob, _) in zip(PAIRS, results, strict=True):
        ids = [EOS, *(context + continuation).encode()]
        expected = direct_logprob(model, ids, len(continuation.encode()))
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)


def test_batching_leaves_scores_unchanged(model):
    requests = [request(c, x) for c, x in PAIRS]
    alone = MemzooLM(model, ByteTokenizer(), batch_size=1).loglikelihood(requests)
    batched = MemzooLM(model, ByteTokenizer(), batch_size=4).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(alone, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b


def test_is_greedy_exactly_for_the_greedy_continuation(model):
    context = "The sun is"
    prompt = torch.tensor([[EOS, *context.encode()]])
    greedy_ids = model.generate(prompt, 3, greedy=True)[0, prompt.shape[1] :].tolist()
    assert all(t < 128 for t in greedy_ids), "pick a context whose greedy bytes are ASCII"
    greedy = bytes(greedy_ids).decode()
    other = greedy[:2] + chr(ord("a") + (ord(greedy[2]) - ord("a") + 1) % 26)
    lm = MemzooLM(model, ByteTokenizer())
    (_, is_greedy), (_, is_other_greedy) = lm.loglikelihood(
        [request(context, greedy), request(context, other)]
    )
    assert is_greedy and not is_other_greedy


def test_rolling_without_a_limit_scores_the_whole_text(model):
    text = "There and back again. The sun is yellow."
    (logprob,) = MemzooLM(model, ByteTokenizer()).loglikelihood_rolling([request(text)])
    ids = [EOS, *text.encode()]
    assert logprob == pytest.approx(direct_logprob(model, ids, len(ids) - 1), abs=1e-4)


@torch.no_grad()
def test_rolling_windows_predict_each_token_once_within_max_length(model):
    text, W = "The grass is green. Here", 8
    (logprob,) = MemzooLM(model, ByteTokenizer(), max_length=W).loglikelihood_rolling(
        [request(text)]
    )
    # token j of <eos> + text (j >= 1) lies in window k = (j - 1) // W, which predicts up to
    # token end_k = min((k + 1) W, n) from at most W inputs: context starts at max(0, end_k - W)
    ids, n = [EOS, *text.encode()], len(text.encode())
    expected = 0.0
    for j in range(1, n + 1):
        end = min(((j - 1) // W + 1) * W, n)
        context = torch.tensor([ids[max(0, end - W) : j]])
        expected += torch.log_softmax(model(context)[0, -1].double(), -1)[ids[j]].item()
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_max_length_cuts_the_context_from_the_left(model):
    lm = MemzooLM(model, ByteTokenizer(), max_length=6)
    ((logprob, _),) = lm.loglikelihood([request("abcdefghij", "kl")])
    ids = [EOS, *b"abcdefghijkl"][-7:]
    assert logprob == pytest.approx(direct_logprob(model, ids, 2), abs=1e-4)


@torch.no_grad()
def test_generate_until_is_greedy_and_stops_at_the_first_stop_string(model):
    context = "The sky is"
    prompt = torch.tensor([[EOS, *context.encode()]])
    tokens = model.generate(prompt, 6, greedy=True)[0, prompt.shape[1] :].tolist()
    full = ByteTokenizer().decode(t for t in tokens if t < 256)
    assert EOS not in tokens and len(full) >= 4
    stop = full[2:4]
    out = MemzooLM(model, ByteTokenizer()).generate_until(
        [
            request(context, {"until": [], "max_gen_toks": 6}),
            request(context, {"until": [stop], "max_gen_toks": 6, "do_sample": False}),
        ]
    )
    assert out == [full, full[: full.index(stop)]]


def test_sampling_is_refused(model):
    with pytest.raises(ValueError, match="only greedy decoding"):
        MemzooLM(model, ByteTokenizer()).generate_until([request("a", {"do_sample": True})])


def test_missing_lm_eval_is_a_clear_import_error(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"memzoo\[eval\]"):
        evaluate_tasks(MemzooLM(model, ByteTokenizer()), ["memzoo"], data_dir=tmp_path)


# ---- task data ---------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_data_is_deterministic_and_pairs_single_with_jrt(tmp_path):
    kwargs = {"num_examples": 3, "passkey_lengths": (260, 300), "num_kv_pairs": 4}
    paths = write_task_data(tmp_path / "a", **kwargs)
    again = write_task_data(tmp_path / "b", **kwargs)
    assert sorted(paths) == sorted(TASK_FILES)
    for task in TASK_FILES:
        assert paths[task].read_bytes() == again[task].read_bytes()
    passkey, passkey_jrt = (read_jsonl(paths[t]) for t in ("memzoo_passkey", "memzoo_passkey_jrt"))
    assert [r["length"] for r in passkey] == [260] * 3 + [300] * 3
    for once, twice in zip(passkey, passkey_jrt, strict=True):
        document = once["prompt"].split(QUESTION)[0]
        assert twice["prompt"] == document + "\n" + once["prompt"]
        assert twice["key"] == once["key"] and len(once["key"]) == 5
    mqar, mqar_jrt = (read_jsonl(paths[t]) for t in ("memzoo_mqar", "memzoo_mqar_jrt"))
    for once, twice in zip(mqar, mqar_jrt, strict=True):
        context, _, key = once["prompt"].rpartition(" ")
        assert twice["prompt"] == f"{context}\n{context} {key}"
        assert twice["choices"] == once["choices"] and twice["gold"] == once["gold"]
        pairs = dict(pair.split(" ") for pair in context.rstrip(".").split(", "))
        assert len(pairs) == 4 and pairs[key] == once["choices"][once["gold"]]


def test_task_loader_needs_a_data_dir():
    with pytest.raises(ValueError, match="data_dir"):
        load_task_data(file="memzoo_mqar.jsonl", version=1.0)


# ---- lm-eval end to end ------------------------------------------------------------------


@torch.no_grad()
def test_lm_eval_command_scores_mqar_as_the_lm_does(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    run = tmp_path / "run"
    make_checkpoint(run)
    argv = ["eval", "lm-eval", "--checkpoint", str(run), "--tasks", "memzoo_mqar"]
    assert run_cli([*argv, "--examples", "12", "--num-kv-pairs", "3"]) == 0
    acc = json.loads((run / "lm_eval.json").read_text())["results"]["memzoo_mqar"]["acc,none"]
    assert "memzoo_mqar" in capsys.readouterr().out

    # The same accuracy from the checkpoint's LM directly: the choice of highest log-likelihood.
    model, _, _ = load_trained_lm(run, device="cpu")
    correct = []
    for record in read_jsonl(run / "lm_eval_data" / "memzoo_mqar.jsonl"):
        context = [EOS, *record["prompt"].encode()]
        scores = [
            direct_logprob(model, context + list(f" {c}".encode()), len(c) + 1)
            for c in record["choices"]
        ]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == record["gold"])
    assert acc == pytest.approx(sum(correct) / len(correct))
    assert 0 < acc < 1


def test_lm_eval_passkey_task_scores_the_first_generated_number(tmp_path):
    """Through lm-eval's generate_until, regex filter and exact match: an oracle that gets
    the keys right except a digit of every even key scores the share of odd keys."""
    pytest.importorskip("lm_eval")
    oracle = MemzooLM(KeyReadingOracle(miss_even_keys=True), ByteTokenizer(), batch_size=8)
    results = evaluate_tasks(
        oracle, ["memzoo_passkey"], data_dir=tmp_path, num_examples=8, passkey_lengths=(260,)
    )
    keys = [int(r["key"]) for r in read_jsonl(tmp_path / "memzoo_passkey.jsonl")]
    odd = sum(k % 2 for k in keys) / len(keys)
    assert 0 < odd < 1
    exact = results["results"]["memzoo_passkey"]["exact_match,first_number"]
    assert exact == pytest.approx(odd)
