"""MQAR: the generator's layout and statistics, its validation, the trainer's data and the
accuracy metric."""

from __future__ import annotations

import pytest
import torch

from memzoo.eval.mqar import (
    IGNORE,
    MQARConfig,
    MQARData,
    MQAREvaluator,
    gap_distribution,
    generate_mqar,
    mqar_accuracy,
)

LAYOUTS = [
    pytest.param(64, 64, 8, 1, True, id="V64-T64-kv8-random"),
    pytest.param(32, 40, 4, 1, False, id="V32-T40-kv4-zeros"),
    pytest.param(8192, 128, 16, 1, True, id="V8192-T128-kv16-random"),
    pytest.param(32, 37, 3, 2, True, id="V32-T37-kv3-passes2"),
]


def _context(config: MQARConfig, input_ids: torch.Tensor):
    """keys, values `[N, kv]` of the first pass."""
    first = input_ids[:, : 2 * config.num_kv_pairs]
    return first[:, 0::2], first[:, 1::2]


@pytest.mark.parametrize(("V", "T", "kv", "passes", "random"), LAYOUTS)
def test_context_holds_distinct_keys_then_values(V, T, kv, passes, random):
    config = MQARConfig(V, T, kv, num_examples=200, num_passes=passes, random_non_queries=random)
    input_ids, labels = generate_mqar(config, seed=1)
    assert input_ids.shape == labels.shape == (200, T)
    assert input_ids.dtype == labels.dtype == torch.int64
    keys, values = _context(config, input_ids)
    assert bool(((keys >= 1) & (keys < V // 2)).all())
    assert bool(((values >= V // 2) & (values < V)).all())
    for pool in (keys, values):
        assert bool((pool.sort(dim=1).values.diff(dim=1) != 0).all()), "repeated key or value"
    assert bool((labels[:, : config.context_len] == IGNORE).all())


@pytest.mark.parametrize(("V", "T", "kv", "passes", "random"), LAYOUTS)
def test_every_key_is_queried_once_after_the_context_with_its_value_as_label(
    V, T, kv, passes, random
):
    config = MQARConfig(V, T, kv, num_examples=200, num_passes=passes, random_non_queries=random)
    input_ids, labels = generate_mqar(config, seed=2)
    keys, values = _context(config, input_ids)
    query = labels != IGNORE
    assert bool((query.sum(dim=1) == kv).all())
    positions = query.nonzero()[:, 1].view(200, kv)
    assert bool((positions >= config.context_len).all())
    assert bool(((positions - config.context_len) % 2 == 0).all()), "queries sit on even offsets"
    queried = input_ids.gather(1, positions)
    answers = labels.gather(1, positions)
    # The query at each position is a context key, each key exactly once, labelled with the
    # value that followed it in the context.
    order = queried.argsort(dim=1)
    assert torch.equal(queried.gather(1, order), keys.sort(dim=1).values)
    expected = values.gather(1, keys.argsort(dim=1))
    assert torch.equal(answers.gather(1, order), expected)


def test_fillers_are_zero_or_random_tokens():
    zeros = MQARConfig(64, 64, 8, num_examples=100, random_non_queries=False)
    random = MQARConfig(64, 64, 8, num_examples=100, random_non_queries=True)
    (z_ids, z_labels), (r_ids, r_labels) = generate_mqar(zeros, 3), generate_mqar(random, 3)
    filler = torch.zeros_like(z_labels, dtype=torch.bool)
    filler[:, zeros.context_len :] = True
    filler &= z_labels == IGNORE
    assert bool((z_ids[filler] == 0).all())
    r_filler = r_ids[(r_labels == IGNORE) & (torch.arange(64) >= random.context_len)]
    # 100 * 48 uniform draws from 64 tokens: every token shows up, and 0 only ~1/64 of the time.
    assert r_filler.unique().numel() == 64
    assert (r_filler == 0).float().mean().item() < 0.05


def test_same_seed_same_examples_and_other_seed_other_examples():
    config = MQARConfig(256, 64, 8, num_examples=50)
    a, b, c = generate_mqar(config, 7), generate_mqar(config, 7), generate_mqar(config, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_num_passes_repeats_the_context_exactly_and_queries_follow_the_last_pass():
    config = MQARConfig(64, 64, 5, num_examples=100, num_passes=3)
    input_ids, labels = generate_mqar(config, seed=4)
    block = input_ids[:, :10]
    assert torch.equal(input_ids[:, :30], block.repeat(1, 3))
    assert config.context_len == 30
    assert bool((labels[:, :30] == IGNORE).all())
    assert bool(((labels != IGNORE).sum(dim=1) == 5).all())


def test_gap_of_the_first_query_follows_the_power_law():
    """Key i takes the i-th slot drawn, so the first context key's slot follows p(gap)
    exactly; the second follows the law of a second draw without replacement."""
    config = MQARConfig(64, 48, 4, num_examples=20_000, random_non_queries=False)
    input_ids, labels = generate_mqar(config, seed=5)
    slots = config.query_slots
    p = gap_distribution(slots, config.power_a)
    assert bool((p.diff() < 0).all())
    queries = labels != IGNORE
    first_key, second_key = input_ids[:, 0], input_ids[:, 2]
    found = {}
    for name, key in (("first", first_key), ("second", second_key)):
        position = ((input_ids == key[:, None]) & queries).float().argmax(dim=1)
        slot = (position - config.context_len) // 2
        found[name] = torch.bincount(slot, minlength=slots).double() / config.num_examples
    second = (p[:, None] * p[None, :] / (1 - p[:, None])).fill_diagonal_(0).sum(dim=0)
    # Standard error of a frequency near 0.3 over 20k draws is ~0.0033: allow 4 of them.
    assert (found["first"] - p).abs().max().item() < 0.014
    assert (found["second"] - second).abs().max().item() < 0.014
    assert found["first"][0] > found["first"][1] > found["first"][4] > found["first"][-1]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(
            {"vocab_size": 16, "num_kv_pairs": 8}, "vocab_size=16 holds 7 keys", id="V16-kv8"
        ),
        pytest.param(
            {"seq_len": 20, "num_kv_pairs": 4, "num_passes": 2},
            "seq_len=20 is too short",
            id="T20-kv4-passes2",
        ),
        pytest.param({"seq_len": 15, "num_kv_pairs": 4}, "use seq_len >= 16", id="T15-kv4"),
        pytest.param({"num_passes": 0}, "num_passes must be an int >= 1", id="passes0"),
        pytest.param({"power_a": 0.0}, "power_a must be > 0", id="power0"),
        pytest.param({"num_examples": 0}, "num_examples must be an int >= 1", id="examples0"),
    ],
)
def test_bad_configs_raise_naming_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**options)


def test_generate_rejects_a_non_config():
    with pytest.raises(TypeError, match="config must be an MQARConfig"):
        generate_mqar({"vocab_size": 64}, seed=0)


def _data(**kwargs) -> MQARData:
    train = [MQARConfig(64, 32, 4, num_examples=40), MQARConfig(64, 64, 8, num_examples=24)]
    test = [MQARConfig(64, 64, 8, num_examples=10)]
    return MQARData(train, test, **{"global_batch": 8, "seed": 3, **kwargs})


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    data = _data()
    assert data.steps_per_epoch() == 5 + 3
    first = [data.batch(s) for s in range(8)]
    again = _data()
    assert torch.equal(again.batch(6)["input_ids"], first[6]["input_ids"])
    # One epoch visits every training example once; a batch holds one slice (one length).
    seen = sorted(tuple(row.tolist()) for b in first for row in b["input_ids"])
    pool = sorted(
        tuple(row.tolist())
        for config in data.train
        for row in generate_mqar(config, data.seed + data.train.index(config))[0]
    )
    assert seen == pool
    assert {b["input_ids"].shape[1] for b in first} == {32, 64}
    assert not torch.equal(data.batch(8)["input_ids"], first[0]["input_ids"])


def test_ranks_split_a_global_batch_into_disjoint_shares():
    data = _data()
    full = data.batch(5)["input_ids"]
    shares = [data.batch(5, rank=r, world_size=2)["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(shares).sort(dim=0).values, full.sort(dim=0).values)


def test_a_slice_smaller_than_the_batch_is_an_error():
    with pytest.raises(ValueError, match="num_examples=24, fewer than global_batch=32"):
        _data(global_batch=32)


def test_test_slices_need_distinct_names():
    test = [MQARConfig(64, 64, 8, num_examples=10), MQARConfig(64, 64, 8, num_examples=20)]
    with pytest.raises(ValueError, match="test slices must differ"):
        MQARData(test[:1], test, global_batch=4)


def test_state_dict_identifies_the_data():
    data = _data()
    data.load_state_dict(_data().state_dict())
    with pytest.raises(ValueError, match="other MQAR data"):
        data.load_state_dict(_data(seed=4).state_dict())


class _RecallOracle(torch.nn.Module):
    """Answers a query with the token that followed its key in the first 2 kv context tokens,
    except for even keys, where it answers token 0: a model of known per-example accuracy."""

    def __init__(self, vocab_size: int, context_len: int):
        super().__init__()
        self.vocab_size, self.context_len = vocab_size, context_len
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def hidden_states(self, input_ids):
        keys, values = (
            input_ids[:, 0 : self.context_len : 2],
            input_ids[:, 1 : self.context_len : 2],
        )
        match = input_ids[:, :, None] == keys[:, None, :]
        answer = (match.long() * values[:, None, :]).sum(-1)
        answer = torch.where(input_ids % 2 == 0, 0, answer)
        return torch.nn.functional.one_hot(answer, self.vocab_size).float()

    def logits(self, hidden):
        return hidden


def test_accuracy_is_the_fraction_of_each_examples_queries_answered():
    config = MQARConfig(64, 64, 8, num_examples=30)
    input_ids, labels = generate_mqar(config, seed=6)
    oracle = _RecallOracle(64, config.context_len)
    accuracy = mqar_accuracy(oracle, input_ids, labels, batch_size=7)
    keys = input_ids[:, 0 : config.context_len : 2]
    expected = (keys % 2 == 1).float().mean(dim=1)
    assert torch.equal(accuracy, expected)
    assert 0.2 < accuracy.mean().item() < 0.8


def test_evaluator_reports_overall_and_per_slice_accuracy():
    test = [MQARConfig(64, 32, 4, num_examples=12), MQARConfig(64, 64, 8, num_examples=20)]
    data = MQARData(test, test, global_batch=4, seed=0)
    record = MQAREvaluator(data)(_RecallOracle(64, 8))  # reads 4 pairs: right on T32-kv4 only
    odd = [
        (generate_mqar(c, data.seed + 1_000_003 + i)[0][:, 0 : 2 * c.num_kv_pairs : 2] % 2)
        for i, c in enumerate(test)
    ]
    assert record["accuracy/T32-kv4"] == pytest.approx(odd[0].float().mean().item())
    assert record["accuracy/T64-kv8"] < record["accuracy/T32-kv4"]
    assert set(record) == {"accuracy", "accuracy/T32-kv4", "accuracy/T64-kv8"}
