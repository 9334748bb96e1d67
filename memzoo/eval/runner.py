"""Train small LMs on MQAR with the shared trainer and record recall against state size.

    task = MQARTask(train=[MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=8,
                                      num_examples=8000)],
                    test=[MQARConfig(vocab_size=256, seq_len=64, num_kv_pairs=8,
                                     num_examples=256)])
    results = sweep_learning_rates(MQARModel("based", 64, short_conv=True), task,
                                   lrs=[1e-3, 3e-3], out_dir="runs/mqar-based")
    best = best_result(results)          # accuracy, params, state_size per test slice

The model (`MQARModel`) is zoology's MQAR model: `n_layers` (2) blocks of one mixer, optionally
preceded in every block by BASED's gated short convolution (zoology's `Hybrid([BaseConv,
mixer])`; pattern entry "short_conv+<mixer>"), which lets a recurrent layer bind each value to
the key just before it. No FFN by default: zoology's MQAR configs set the state mixer to
Identity, so recall rests on the sequence mixers alone; `ffn="swiglu"` or "mlp" adds one.

Training (`MQARTask`): AdamW through memzoo.train.trainer.Trainer on `MQARData` for `epochs`
passes over the fixed training set, linear warmup then cosine decay, the loss and the LM head
only at query positions (LM.forward(only_labeled=True)), an evaluation every `eval_every`
steps, and an early stop once the test accuracy reaches `stop_accuracy`. After training, each
single-pass test slice is also read twice (JRT-Prompt, `memzoo.eval.jrt.mqar_jrt_gain`) on
the same examples.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memzoo.eval.jrt import JRTGain, mqar_jrt_gain
from memzoo.eval.mqar import MQARConfig, MQARData, MQAREvaluator
from memzoo.models.config import LMConfig
from memzoo.train.config import RunConfig
from memzoo.train.trainer import Trainer

__all__ = ["MQARModel", "MQARResult", "MQARTask", "best_result", "run_mqar", "sweep_learning_rates"]


@dataclass
class MQARModel:
    """The LM of one MQAR run: `n_layers` blocks of `mixer` (with `mixer_options`), each
    preceded by a gated short convolution when `short_conv`, with FFN `ffn` ("none": none)."""

    mixer: str
    d_model: int
    mixer_options: dict = field(default_factory=dict)
    short_conv: bool = False
    n_layers: int = 2
    ffn: str = "none"

    def lm_config(self, vocab_size: int) -> LMConfig:
        entry = ["short_conv", self.mixer] if self.short_conv else self.mixer
        return LMConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            vocab_size=vocab_size,
            pattern=[entry],
            mixer_options={self.mixer: dict(self.mixer_options)} if self.mixer_options else {},
            ffn=self.ffn,
        )


@dataclass
class MQARTask:
    """What to train on and how: the train and test slices (one vocab_size), the batch size,
    the epochs over the training set, warmup (a fraction of the steps), weight decay, an
    evaluation every `eval_every` steps, the early-stop accuracy, and the seed of the data
    and of the model's initialisation."""

    train: Sequence[MQARConfig]
    test: Sequence[MQARConfig]
    batch_size: int = 64
    epochs: float = 4.0
    warmup: float = 0.05
    weight_decay: float = 0.1
    eval_every: int = 100
    stop_accuracy: float = 0.99
    seed: int = 0

    def __post_init__(self):
        vocab = {c.vocab_size for c in (*self.train, *self.test)}
        if len(vocab) != 1:
            raise ValueError(
                f"MQARTask: every train and test slice must share one vocab_size, got "
                f"{sorted(vocab)}"
            )
        if not self.epochs > 0:
            raise ValueError(f"MQARTask: epochs must be > 0, got {self.epochs!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"MQARTask: warmup must lie in [0, 1), got {self.warmup!r}")

    @property
    def vocab_size(self) -> int:
        return self.train[0].vocab_size

    def make_data(self) -> MQARData:
        return MQARData(self.train, self.test, global_batch=self.batch_size, seed=self.seed)

    def steps(self, data: MQARData) -> int:
        """Optimizer steps of a run: `epochs` passes of data's batches."""
        return max(1, math.ceil(self.epochs * data.steps_per_epoch()))


@dataclass
class MQARResult:
    """One finished run. accuracy: mean over all test examples; slice_accuracy and
    state_size (floats of inference state per sequence, LM.state_size) per test slice name;
    params: the LM's parameter count; steps trained; seconds of wall time; jrt: per
    single-pass test slice, the accuracy with the key-value context read once and twice."""

    mixer: str
    d_model: int
    lr: float
    accuracy: float
    slice_accuracy: dict[str, float]
    state_size: dict[str, int]
    params: int
    steps: int
    seconds: float
    stopped_early: bool
    jrt: dict[str, JRTGain] = field(default_factory=dict)


def run_mqar(
    model: MQARModel,
    task: MQARTask,
    lr: float,
    out_dir: str | Path,
    *,
    data: MQARData | None = None,
    device: str | None = None,
) -> MQARResult:
    """Train `model` on `task` at learning rate `lr` in a fresh run directory `out_dir` (an
    existing one is replaced: it holds an unfinished run). data: a prebuilt `task.make_data()`
    to share between runs. Returns the accuracy of the final evaluation."""
    started = time.perf_counter()
    data = task.make_data() if data is None else data
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = task.steps(data)
    config = RunConfig.from_dict(
        {
            "model": model.lm_config(task.vocab_size).to_dict(),
            "data": {"seq_len": max(c.seq_len for c in data.train), "heldout": 0.0},
            "train": {
                "steps": steps,
                "global_batch": task.batch_size,
                "lr": lr,
                "warmup": max(1, round(task.warmup * steps)),
                "weight_decay": task.weight_decay,
                "seed": task.seed,
                "log_every": min(task.eval_every, steps),
                "eval_every": task.eval_every,
                "eval_batches": data.num_eval_batches(task.batch_size),
                "sample_tokens": 0,
                "save_every": steps,
                "keep_last": 1,
                "out_dir": str(out_dir),
                "progress": False,
            },
        }
    )
    config.validate()
    evaluator = MQAREvaluator(data)
    records: list[dict] = []

    def evaluate(lm) -> dict:
        records.append(evaluator(lm))
        return records[-1]

    trainer = Trainer(
        config,
        device=device,
        data=data,
        evaluator=evaluate,
        early_stop=lambda record: record["accuracy"] >= task.stop_accuracy,
    )
    # Only the query positions carry labels: the LM head (V x d per position) would otherwise
    # dominate the step at zoology's vocabulary of 8192. The trainer has no switch for it.
    trainer.forward = functools.partial(trainer.forward, only_labeled=True)
    try:
        result = trainer.run()
    finally:
        trainer.dist.close()
    if result.interrupted:  # the trainer turned SIGINT/SIGTERM into a checkpoint and a stop
        raise KeyboardInterrupt(f"run_mqar: {out_dir} was interrupted at step {result.step}")
    final = records[-1]
    # The test slices' own seeds (MQARData's), so "once" repeats the final evaluation.
    jrt = {
        c.name: mqar_jrt_gain(trainer.model, c, data.seed + 1_000_003 + i)
        for i, c in enumerate(data.test)
        if c.num_passes == 1
    }
    return MQARResult(
        mixer=model.mixer,
        d_model=model.d_model,
        lr=lr,
        accuracy=final["accuracy"],
        slice_accuracy={c.name: final[f"accuracy/{c.name}"] for c in data.test},
        state_size={c.name: trainer.model.state_size(c.seq_len) for c in data.test},
        params=trainer.model.num_params(),
        steps=result.step,
        seconds=time.perf_counter() - started,
        stopped_early=result.stopped_early,
        jrt=jrt,
    )


def sweep_learning_rates(
    model: MQARModel,
    task: MQARTask,
    lrs: Sequence[float],
    out_dir: str | Path,
    *,
    data: MQARData | None = None,
    device: str | None = None,
) -> list[MQARResult]:
    """`run_mqar` at each learning rate, in `out_dir/lr<lr>`; the results in lrs' order."""
    data = task.make_data() if data is None else data
    return [
        run_mqar(model, task, lr, Path(out_dir) / f"lr{lr:.1e}", data=data, device=device)
        for lr in lrs
    ]


def best_result(results: Sequence[MQARResult]) -> MQARResult:
    """The run with the highest accuracy (the smaller learning rate among ties)."""
    if not results:
        raise ValueError("best_result: no results given")
    return max(results, key=lambda r: (r.accuracy, -r.lr))
