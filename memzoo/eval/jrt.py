"""JRT-Prompt (Arora et al. 2024, "Just read twice: closing the recall gap for recurrent
language models", arXiv:2407.05483): the same recall question, with the context written once
and written twice.

A recurrent model must choose what to keep in its fixed-size state as it reads; in the second
copy it chooses having already seen the whole context. The gain is the accuracy with two passes
minus the accuracy with one, on the same examples:

- passkey: `document + "\\n" + document + question` (PasskeyConfig(num_passes=2)); one seed
  gives the same filler, depth and key to both prompts.
- MQAR: the key-value block twice (MQARConfig(num_passes=2)) with the sequence lengthened by
  one context, so the query region, and with one seed the pairs and the queries, are the same.

    config = PasskeyConfig(seq_len=512)
    gains = {mixer: passkey_jrt_gain(model, config) for mixer, model in models.items()}
    print(format_jrt_table(gains))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from memzoo.eval.passkey import PasskeyConfig, evaluate_passkey

__all__ = ["JRTGain", "format_jrt_table", "jrt_gain", "mqar_jrt_gain", "passkey_jrt_gain"]


@dataclass(frozen=True)
class JRTGain:
    """Accuracy with the context read once and twice; gain = repeated - single."""

    single: float
    repeated: float

    @property
    def gain(self) -> float:
        return self.repeated - self.single

    def to_dict(self) -> dict[str, float]:
        return {"single": self.single, "repeated": self.repeated, "gain": self.gain}


def jrt_gain(
    evaluate_single: Callable[[], float], evaluate_repeated: Callable[[], float]
) -> JRTGain:
    """Run both evaluations (each returns an accuracy in [0, 1]) and pair them."""
    single, repeated = float(evaluate_single()), float(evaluate_repeated())
    for name, value in (("evaluate_single", single), ("evaluate_repeated", repeated)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"jrt_gain: {name} must return an accuracy in [0, 1], got {value}")
    return JRTGain(single=single, repeated=repeated)


def passkey_jrt_gain(
    model,
    config: PasskeyConfig,
    *,
    num_examples: int = 100,
    seed: int | Sequence[int] = 0,
    batch_size: int = 16,
    mode: str = "teacher_forced",
    tokenizer=None,
) -> JRTGain:
    """Passkey exact match with the document once (config as given, num_passes=1) and twice.

    The remaining arguments go to memzoo.eval.passkey.evaluate_passkey; both runs share the
    seed, so each repeated prompt holds the single prompt's document and key.
    """
    if config.num_passes != 1:
        raise ValueError(
            f"passkey_jrt_gain: config.num_passes must be 1 (the single pass), got "
            f"{config.num_passes}"
        )

    options = {"num_examples": num_examples, "seed": seed, "batch_size": batch_size}
    options |= {"mode": mode, "tokenizer": tokenizer}
    twice = replace(config, num_passes=2)
    return jrt_gain(
        lambda: evaluate_passkey(model, config, **options).exact_match,
        lambda: evaluate_passkey(model, twice, **options).exact_match,
    )


def mqar_jrt_gain(model, config, seed: int, *, batch_size: int = 256) -> JRTGain:
    """MQAR accuracy with the key-value context once and twice.

    config: a memzoo.eval.mqar.MQARConfig with num_passes=1; the repeated examples use
    num_passes=2 and seq_len + 2 * num_kv_pairs (room for the second copy), so with one seed
    both hold the same pairs queried at the same offsets after the context.
    """
    from memzoo.eval.mqar import generate_mqar, mqar_accuracy

    if config.num_passes != 1:
        raise ValueError(
            f"mqar_jrt_gain: config.num_passes must be 1 (the single pass), got {config.num_passes}"
        )
    repeated = replace(config, num_passes=2, seq_len=config.seq_len + config.context_len)

    def accuracy(slice_config) -> float:
        input_ids, labels = generate_mqar(slice_config, seed)
        return float(mqar_accuracy(model, input_ids, labels, batch_size=batch_size).mean())

    return jrt_gain(lambda: accuracy(config), lambda: accuracy(repeated))


def format_jrt_table(gains: Mapping[str, JRTGain]) -> str:
    """A plain-text table, one row per model (e.g. per mixer): single, repeated, gain."""
    width = max([len("model"), *(len(name) for name in gains)])
    lines = [f"{'model':<{width}}  {'single':>7}  {'twice':>7}  {'gain':>7}"]
    for name, g in gains.items():
        lines.append(f"{name:<{width}}  {g.single:>7.3f}  {g.repeated:>7.3f}  {g.gain:>+7.3f}")
    return "\n".join(lines)
