"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: measuring and improving
recall in efficient language models", arXiv 2312.04927), with zoology's semantics.

The vocabulary splits into keys `[1, V/2)` and values `[V/2, V)`. An example of T tokens
starts with its context: `num_kv_pairs` pairs `k_1 v_1 k_2 v_2 ...` of distinct keys and
distinct values, repeated `num_passes` times (JRT-Prompt: reading the context twice). The
remaining `(T - C) // 2` even slots after the context (C = 2 * num_kv_pairs * num_passes)
receive one query per key, at slot gaps drawn without replacement with
`p(gap) ∝ gap^(power_a - 1)` (gap = 1, 2, ...; power_a = 0.01 clusters the queries right after
the context, as repeated bigrams cluster in text). A query of key k at position
`C + 2 (gap - 1)` holds k as input and k's value as label; every other label is -100
(ignored); every other query-region input is 0, or a uniformly random token with
`random_non_queries`. zoology's example (V = 12, 2 pairs, T = 16, no random tokens)::

    inputs: 2    8    4    7    0    0    4    0    0    0    0    0    2    0    0    0
    labels: -100 -100 -100 -100 -100 -100 7    -100 -100 -100 -100 -100 8    -100 -100 -100

`generate_mqar(config, seed)` is a pure function of its arguments, vectorised over examples.
`MQARData` serves a fixed training set and a fixed test set to the shared trainer
(memzoo.train.source.TrainingData); `mqar_accuracy` scores a model per example (the fraction
of its queries answered correctly) and `MQAREvaluator` per (seq_len, num_kv_pairs) slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["MQARConfig", "MQARData", "MQAREvaluator", "generate_mqar", "mqar_accuracy"]

IGNORE = -100


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"MQARConfig: {name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR slice: `num_examples` sequences of `seq_len` tokens (see the module docstring).

    Raises ValueError when the vocabulary holds fewer than num_kv_pairs keys or values, or
    when seq_len cannot hold the context plus one query slot per key.
    """

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    num_examples: int = 1000
    num_passes: int = 1
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        _check_int("vocab_size", self.vocab_size, 4)
        _check_int("seq_len", self.seq_len, 1)
        _check_int("num_kv_pairs", self.num_kv_pairs, 1)
        _check_int("num_examples", self.num_examples, 1)
        _check_int("num_passes", self.num_passes, 1)
        if not isinstance(self.power_a, (int, float)) or not self.power_a > 0:
            raise ValueError(f"MQARConfig: power_a must be > 0, got {self.power_a!r}")
        if not isinstance(self.random_non_queries, bool):
            raise TypeError(
                f"MQARConfig: random_non_queries must be a bool, got {self.random_non_queries!r}"
            )
        num_keys = self.vocab_size // 2 - 1
        if self.num_kv_pairs > num_keys:
            raise ValueError(
                f"MQARConfig: vocab_size={self.vocab_size} holds {num_keys} keys "
                f"([1, {self.vocab_size // 2})), fewer than num_kv_pairs={self.num_kv_pairs}; "
                f"use vocab_size >= {2 * self.num_kv_pairs + 2}"
            )
        if self.query_slots < self.num_kv_pairs:
            needed = self.context_len + 2 * self.num_kv_pairs
            raise ValueError(
                f"MQARConfig: seq_len={self.seq_len} is too short for num_kv_pairs="
                f"{self.num_kv_pairs} with num_passes={self.num_passes}: the context takes "
                f"{self.context_len} tokens and each key needs a query slot of 2 tokens after "
                f"it; use seq_len >= {needed}"
            )

    @property
    def context_len(self) -> int:
        """Tokens of the key-value context, all passes: 2 * num_kv_pairs * num_passes."""
        return 2 * self.num_kv_pairs * self.num_passes

    @property
    def query_slots(self) -> int:
        """Positions a query may take: the even offsets after the context."""
        return (self.seq_len - self.context_len) // 2

    @property
    def name(self) -> str:
        """The slice's label, e.g. `T64-kv4` (`T64-kv4-x2` with two passes)."""
        passes = f"-x{self.num_passes}" if self.num_passes > 1 else ""
        return f"T{self.seq_len}-kv{self.num_kv_pairs}{passes}"

    def to_dict(self) -> dict:
        return asdict(self)


def gap_distribution(slots: int, power_a: float) -> torch.Tensor:
    """p(gap) ∝ gap^(power_a - 1) for gap = 1..slots, normalised, float64 `[slots]`."""
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    p = gaps ** (power_a - 1)
    return p / p.sum()


def _distinct_uniform(pool: int, rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, pool) per row, uniformly over ordered k-subsets, `[rows, k]`.

    Floyd's algorithm, vectorised over rows: for j = pool-k .. pool-1 draw t in [0, j] and
    take t, or j when t is already taken; this costs O(rows k^2) instead of the O(rows pool)
    of sorting random scores, which matters for zoology's 4095 keys. Floyd's subset is uniform
    but its order is not, so the k picks are shuffled at the end.
    """
    picks = torch.empty(rows, k, dtype=torch.int64)
    for i, j in enumerate(range(pool - k, pool)):
        t = torch.randint(j + 1, (rows,), generator=generator)
        taken = (picks[:, :i] == t[:, None]).any(dim=1)
        picks[:, i] = torch.where(taken, j, t)
    order = torch.rand(rows, k, generator=generator).argsort(dim=1)
    return picks.gather(1, order)


def _weighted_without_replacement(
    p: torch.Tensor, rows: int, k: int, generator: torch.Generator
) -> torch.Tensor:
    """k distinct indices per row drawn one after another with probability ∝ p among those
    left (numpy's choice(replace=False, p=p)), in draw order, `[rows, k]`: the top k of
    log p plus Gumbel noise (Efraimidis-Spirakis) have exactly that law."""
    u = torch.rand(rows, p.numel(), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (p.log() + gumbel).topk(k, dim=1).indices


def generate_mqar(config: MQARConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of one MQAR slice, a pure function of (config, seed).

    Returns input_ids and labels, both `[config.num_examples, config.seq_len]` int64 on the
    CPU; labels are -100 except at the queries, where they hold the queried key's value.
    """
    if not isinstance(config, MQARConfig):
        raise TypeError(f"generate_mqar: config must be an MQARConfig, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"generate_mqar: seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    N, V, T, kv = config.num_examples, config.vocab_size, config.seq_len, config.num_kv_pairs
    half, C = V // 2, config.context_len
    keys = 1 + _distinct_uniform(half - 1, N, kv, generator)
    values = half + _distinct_uniform(V - half, N, kv, generator)
    context = torch.stack([keys, values], dim=2).reshape(N, 2 * kv).repeat(1, config.num_passes)

    p = gap_distribution(config.query_slots, config.power_a)
    slots = _weighted_without_replacement(p, N, kv, generator)  # gap - 1; key i takes slot i
    positions = C + 2 * slots

    input_ids = torch.zeros(N, T, dtype=torch.int64)
    input_ids[:, :C] = context
    input_ids.scatter_(1, positions, keys)
    labels = torch.full((N, T), IGNORE, dtype=torch.int64)
    labels.scatter_(1, positions, values)
    if config.random_non_queries:
        filler = torch.randint(V, (N, T), generator=generator)
        empty = labels == IGNORE
        empty[:, :C] = False
        input_ids = torch.where(empty, filler, input_ids)
    return input_ids, labels


@dataclass
class _Slice:
    config: MQARConfig
    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]


def _build_slices(configs: Sequence[MQARConfig], seed: int) -> list[_Slice]:
    return [_Slice(c, *generate_mqar(c, seed + i)) for i, c in enumerate(configs)]


class MQARData:
    """MQAR for the shared trainer (memzoo.train.source.TrainingData).

    train, test: the slices (MQARConfig) to train and evaluate on; training slice i is drawn
    with seed + i and test slice i with seed + 1000003 + i, so train and test differ. The
    training set is fixed (zoology's epochs). An epoch cuts each training slice, shuffled, into
    whole batches of global_batch rows (a slice's remainder sits that epoch out) and shuffles
    the batches of all slices together; so a batch holds one slice, one length, with no
    padding. The shuffles are drawn from (seed, epoch): batch(step) is a pure function of step.
    """

    tokenizer = None

    def __init__(
        self,
        train: Sequence[MQARConfig],
        test: Sequence[MQARConfig],
        *,
        global_batch: int,
        seed: int = 0,
    ):
        for name, slices in (("train", train), ("test", test)):
            if not slices or not all(isinstance(c, MQARConfig) for c in slices):
                raise ValueError(f"MQARData: {name} must be a non-empty list of MQARConfig")
        if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
            raise ValueError(f"MQARData: global_batch must be an int >= 1, got {global_batch!r}")
        for config in train:
            if config.num_examples < global_batch:
                raise ValueError(
                    f"MQARData: training slice {config.name} holds num_examples="
                    f"{config.num_examples}, fewer than global_batch={global_batch}: it could "
                    "never fill a batch"
                )
        names = [c.name for c in test]
        if len(set(names)) != len(names):
            raise ValueError(f"MQARData: test slices must differ in name (T, kv, passes): {names}")
        self.train, self.test = list(train), list(test)
        self.global_batch, self.seed = global_batch, seed
        self.train_slices = _build_slices(self.train, seed)
        self.test_slices = _build_slices(self.test, seed + 1_000_003)
        self._epoch: tuple[int, list[tuple[int, torch.Tensor]]] | None = None

    @property
    def num_train(self) -> int:
        """Training examples over all slices."""
        return sum(c.num_examples for c in self.train)

    def steps_per_epoch(self) -> int:
        return sum(c.num_examples // self.global_batch for c in self.train)

    def _epoch_batches(self, epoch: int) -> list[tuple[int, torch.Tensor]]:
        """(slice index, rows `[global_batch]`) of every batch of `epoch`, in order."""
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = []
            for i, config in enumerate(self.train):
                order = torch.randperm(config.num_examples, generator=generator)
                whole = config.num_examples // self.global_batch * self.global_batch
                batches += [(i, rows) for rows in order[:whole].split(self.global_batch)]
            shuffle = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch = (epoch, [batches[j] for j in shuffle])
        return self._epoch[1]

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> dict:
        """This process's share (rows rank::world_size) of global batch `step`."""
        if self.global_batch % world_size:
            raise ValueError(
                f"MQARData: global_batch={self.global_batch} must split evenly into "
                f"world_size={world_size} processes"
            )
        epoch, index = divmod(step, self.steps_per_epoch())
        i, rows = self._epoch_batches(epoch)[index]
        rows = rows[rank::world_size]
        s = self.train_slices[i]
        return {"input_ids": s.input_ids[rows], "labels": s.labels[rows]}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """The test slices one after another, in batches of up to batch_size rows."""
        for s in self.test_slices:
            for start in range(0, s.config.num_examples, batch_size):
                yield {
                    "input_ids": s.input_ids[start : start + batch_size],
                    "labels": s.labels[start : start + batch_size],
                }

    def num_eval_batches(self, batch_size: int) -> int:
        """How many batches eval_batches(batch_size) yields."""
        return sum(math.ceil(c.num_examples / batch_size) for c in self.test)

    def save(self, directory: Path) -> None:
        """Nothing to write: MQAR has no tokenizer."""

    def state_dict(self) -> dict:
        return {
            "kind": "mqar",
            "seed": self.seed,
            "global_batch": self.global_batch,
            "train": [c.to_dict() for c in self.train],
            "test": [c.to_dict() for c in self.test],
        }

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise ValueError(
                "MQARData: the checkpoint was trained on other MQAR data "
                f"({state}); this run has {self.state_dict()}"
            )


@torch.no_grad()
def mqar_accuracy(
    model, input_ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256
) -> torch.Tensor:
    """Per example, the fraction of its queries (labels != -100) answered correctly.

    model: a memzoo LM (hidden_states + logits); input_ids, labels `[N, T]` int64. The LM
    head runs only at the query positions. Returns float32 `[N]` on the CPU; an example
    without queries scores nan.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"mqar_accuracy: input_ids and labels must both be [N, T], got "
            f"{tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        target = labels[start : start + batch_size].to(device)
        keep = target != IGNORE
        hidden = model.hidden_states(ids)
        correct = torch.zeros(keep.shape, device=device)
        correct[keep] = (model.logits(hidden[keep]).argmax(-1) == target[keep]).float()
        scores.append((correct.sum(1) / keep.sum(1)).float().cpu())
    model.train(was_training)
    return torch.cat(scores)


class MQAREvaluator:
    """The trainer's evaluator: `evaluator(model) -> {"accuracy": a, "accuracy/<slice>": ...}`,
    `a` the mean over every test example of every slice, each slice's the mean over its own
    (slice names as MQARConfig.name, e.g. `accuracy/T64-kv4`)."""

    def __init__(self, data: MQARData, *, batch_size: int = 256):
        self.data, self.batch_size = data, batch_size

    def __call__(self, model) -> dict[str, float]:
        per_slice = {
            s.config.name: mqar_accuracy(model, s.input_ids, s.labels, batch_size=self.batch_size)
            for s in self.data.test_slices
        }
        record = {"accuracy": float(torch.cat(list(per_slice.values())).mean())}
        record.update({f"accuracy/{name}": float(a.mean()) for name, a in per_slice.items()})
        return record
