"""JRT-Prompt: the document written twice and the question once, and the single-vs-twice gain
for passkey and MQAR on oracles whose answers are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memzoo.eval.jrt import JRTGain, format_jrt_table, jrt_gain, mqar_jrt_gain, passkey_jrt_gain
from memzoo.eval.passkey import QUESTION, PasskeyConfig, passkey_batch
from tests.eval.test_passkey import KeyReadingOracle, as_text


@pytest.mark.parametrize("filler", ["sentences", "noise"])
def test_passkey_prompt_holds_the_document_twice_and_the_question_once(filler):
    once = PasskeyConfig(seq_len=320, filler=filler)
    twice = PasskeyConfig(seq_len=320, filler=filler, num_passes=2)
    single, repeated = passkey_batch(once, 3, seed=2), passkey_batch(twice, 3, seed=2)
    assert repeated.input_ids.shape == (3, twice.total_len)
    assert twice.total_len == 320 + 1 + once.document_len
    assert torch.equal(single.keys, repeated.keys)
    for a, b, key in zip(single.input_ids, repeated.input_ids, single.keys, strict=True):
        text_once, text_twice = as_text(a), as_text(b)
        document, question = text_once.split(QUESTION)
        assert text_twice == document + "\n" + document + QUESTION + question
        assert text_twice.count(QUESTION) == 1
        assert text_twice.count(f"The pass key is {int(key)}.") == 2
    assert torch.equal(single.labels[:, -5:], repeated.labels[:, -5:])


def test_jrt_gain_on_known_numbers():
    gain = jrt_gain(lambda: 0.25, lambda: 0.75)
    assert gain == JRTGain(single=0.25, repeated=0.75)
    assert gain.gain == 0.5
    assert gain.to_dict() == {"single": 0.25, "repeated": 0.75, "gain": 0.5}


def test_jrt_gain_refuses_a_value_that_is_not_an_accuracy():
    with pytest.raises(ValueError, match="evaluate_repeated must return an accuracy"):
        jrt_gain(lambda: 0.5, lambda: 1.5)


def test_table_lists_each_model():
    table = format_jrt_table({"mamba": JRTGain(0.1, 0.4), "attn": JRTGain(0.9, 0.9)})
    assert table.splitlines() == [
        "model   single    twice     gain",
        "mamba    0.100    0.400   +0.300",
        "attn     0.900    0.900   +0.000",
    ]


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_passkey_gain_of_a_model_that_needs_two_reads(mode):
    """An oracle that recalls the key only once it has read two needles: 0 with the document
    once, all right with the document twice."""
    oracle = KeyReadingOracle(reads_needed=2)
    gain = passkey_jrt_gain(oracle, PasskeyConfig(seq_len=280), num_examples=4, mode=mode)
    assert gain == JRTGain(single=0.0, repeated=1.0)


def test_passkey_gain_needs_a_single_pass_config():
    with pytest.raises(ValueError, match="num_passes must be 1"):
        passkey_jrt_gain(KeyReadingOracle(), PasskeyConfig(seq_len=280, num_passes=2))


class PairReadTwiceOracle(nn.Module):
    """An MQAR "model" that answers a query key with the value that followed it at least twice
    earlier in the sequence (the LM interface mqar_accuracy uses: hidden_states + logits)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def hidden_states(self, input_ids):
        B, T = input_ids.shape
        out = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            ids = input_ids[b].tolist()
            for t in range(1, T):
                seen = [ids[i + 1] for i in range(t - 1) if ids[i] == ids[t]]
                for value in set(seen):
                    if seen.count(value) >= 2:
                        out[b, t, value] = 1.0
        return out

    def logits(self, hidden):
        return hidden


def test_mqar_gain_of_a_model_that_needs_two_reads():
    from memzoo.eval.mqar import MQARConfig

    config = MQARConfig(
        vocab_size=32, seq_len=32, num_kv_pairs=4, num_examples=6, random_non_queries=False
    )
    gain = mqar_jrt_gain(PairReadTwiceOracle(32), config, seed=0)
    assert gain == JRTGain(single=0.0, repeated=1.0)
