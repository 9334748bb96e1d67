"""The shared pretraining loop: one process, or many under torchrun (DDP or FSDP2).

    result = Trainer(load_run_config("configs/mamba-tiny.yaml")).run()

What a run directory holds (`train.out_dir`)::

    config.yaml       the resolved run config        tokenizer.json   the tokenizer
    metrics.jsonl     one JSON record per log line   loss.png         the loss curve (at the end)
    checkpoints/      step_XXXXXXXX/ (see memzoo.train.checkpoint), the newest keep_last

The batch of step s is a pure function of (seed, s) (memzoo.train.data.PackedBatches), the
learning rate a function of s, so resuming from a checkpoint reproduces an uninterrupted run
exactly (bit for bit on CPU). A NaN/inf loss stops the run with the last good checkpoint kept;
SIGINT/SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from memzoo.models.lm import LM
from memzoo.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from memzoo.train.config import RunConfig
from memzoo.train.distributed import Distributed
from memzoo.train.plot import plot_losses, read_metrics
from memzoo.train.source import CorpusData, TrainingData

__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "learning_rate",
    "no_decay_names",
    "param_groups",
]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float
    eval_loss: float | None
    tokens_per_s: float
    interrupted: bool = False
    stopped_early: bool = False


def learning_rate(step: int, cfg) -> float:
    """Linear warmup over cfg.warmup steps, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW must not decay: norms, biases, embeddings, gates (anything
    below two dimensions) and parameters marked `_no_weight_decay` (SSM A_log, D, dt bias).

    Read it before FSDP wraps the model: `fully_shard` puts new parameters in place of the
    originals, without their marks, under the same names."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name
        for name, p in model.named_parameters()
        if p.dim() < 2 or id(p) in embeddings or getattr(p, "_no_weight_decay", False)
    }


def param_groups(
    model: nn.Module, weight_decay: float, no_decay: set[str] | None = None
) -> list[dict]:
    """AdamW groups: weight decay on the trainable parameters except those named in no_decay
    (by default `no_decay_names(model)`), none on those."""
    no_decay = no_decay_names(model) if no_decay is None else no_decay
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if name in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Trainer:
    """One training run.

    resume: a run directory to continue from its newest checkpoint.
    data: what to train on (default: `CorpusData` from config.data); see TrainingData.
    evaluator: called with the model at every evaluation; its metrics (e.g. accuracy) join
        the eval record. early_stop: called with that record; True ends the run there.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        resume: str | Path | None = None,
        device=None,
        data: TrainingData | None = None,
        evaluator: Callable[[LM], dict] | None = None,
        early_stop: Callable[[dict], bool] | None = None,
    ):
        self.dist = Distributed.from_env(device)
        self.evaluator, self.early_stop = evaluator, early_stop
        self.stop_signal: int | None = None
        resumed = None
        if resume is not None:
            self.run_dir = Path(resume)
            checkpoint = latest_checkpoint(self.run_dir)
            if checkpoint is None:
                raise CheckpointError(
                    f"--resume {self.run_dir}: no checkpoint found under "
                    f"{self.run_dir / 'checkpoints'}; nothing to resume"
                )
            resumed = load_checkpoint(checkpoint)
            self._check_matches(config, resumed[2], checkpoint)
            config.model = type(config.model).from_dict(resumed[2]["model"])
            self.checkpoint = checkpoint
        else:
            self.run_dir = Path(config.train.out_dir)
            if latest_checkpoint(self.run_dir) is not None:
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoints: pass --resume {self.run_dir} to "
                    "continue that run, or choose another train.out_dir"
                )
        self.config = config
        self.resumed = resumed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_data(data)
        self._build_model()

    # ---- set-up ----------------------------------------------------------------------------

    @staticmethod
    def _check_matches(config: RunConfig, saved: dict, checkpoint: Path) -> None:
        current = config.to_dict()
        for section in ("model", "data"):
            ours, theirs = dict(current[section]), dict(saved.get(section, {}))
            if section == "model":  # set from the tokenizer when the run started
                ours.pop("vocab_size", None)
                theirs.pop("vocab_size", None)
            if ours != theirs:
                keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
                raise CheckpointError(
                    f"the {section} config differs from the one {checkpoint} was trained with "
                    f"(keys: {', '.join(keys)}); resume with the run's own config "
                    "(omit --config) or start a new run"
                )

    def _prepare_data(self, data: TrainingData | None) -> None:
        config, dist, train = self.config.data, self.dist, self.config.train
        options = {"global_batch": train.global_batch, "seed": train.seed}
        if data is not None:
            self.data = data
        elif self.resumed is not None:
            self.data = CorpusData.from_directory(config, self.checkpoint, **options)
        else:
            # Rank 0 builds (and for BPE trains) the tokenizer; the others load its copy.
            if dist.is_main:
                self.data = CorpusData(config, **options)
                self.data.save(self.run_dir)
            dist.barrier()
            if not dist.is_main:
                self.data = CorpusData.from_directory(config, self.run_dir, **options)
        self.tokenizer = self.data.tokenizer
        per_rank, rem = divmod(train.global_batch, dist.world_size)
        micro = train.micro_batch or per_rank
        if rem or per_rank % micro:
            raise ValueError(
                f"train.global_batch={train.global_batch} must split evenly into "
                f"{dist.world_size} process(es) x micro_batch={micro} x accumulation steps"
            )
        self.micro_batch, self.accumulation = micro, per_rank // micro

    def _build_model(self) -> None:
        cfg, dist = self.config, self.dist
        tokenizer = self.tokenizer
        if self.resumed is None and tokenizer is not None:
            cfg.model.vocab_size = tokenizer.vocab_size  # the tokenizer decides
        torch.manual_seed(cfg.train.seed)
        self.model = LM(cfg.model).to(dist.device)
        no_decay = no_decay_names(self.model)  # before FSDP drops the parameters' marks
        self.wrapped = dist.wrap(self.model, cfg.train.distributed)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, t.weight_decay, no_decay), lr=t.lr, betas=tuple(t.betas)
        )
        self.start_step = 0
        if self.resumed is not None:
            model_state, train_state, _ = self.resumed
            try:
                dist.load_full_state(
                    self.wrapped, self.optimizer, model_state, train_state["optimizer"]
                )
            except (RuntimeError, KeyError, ValueError) as error:
                raise CheckpointError(
                    f"{self.checkpoint} does not fit this model: {error}"
                ) from error
            self.data.load_state_dict(train_state["data"])
            torch.set_rng_state(train_state["rng"]["torch"])
            if torch.cuda.is_available() and "cuda" in train_state["rng"]:
                torch.cuda.set_rng_state(train_state["rng"]["cuda"])
            self.start_step = int(train_state["step"])
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> TrainResult:
        dist = self.dist
        if dist.is_main:
            _atomic_text(
                self.run_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False)
            )
            self._trim_metrics()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _loop(self) -> TrainResult:
        cfg, dist = self.config.train, self.dist
        bar = None
        if dist.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, unit="step", dynamic_ncols=True)
        step, last_loss, eval_loss, rate = self.start_step, float("nan"), None, 0.0
        stopped_early = False
        loss_sum = torch.zeros((), device=dist.device)
        logged_at, logged_time, saved_at = step, time.perf_counter(), step
        self.model.train()
        while step < cfg.steps:
            lr = learning_rate(step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, aux, grad_norm, tokens_per_step = self._step(step)
            loss_sum += loss
            step += 1
            if bar is not None:
                bar.update(1)
            stop = dist.any(self.stop_signal is not None)
            last = step == cfg.steps
            if step % cfg.log_every == 0 or last or stop or step % cfg.save_every == 0:
                mean = dist.mean(loss_sum / (step - logged_at)).item()
                norm = float(grad_norm)
                if not (math.isfinite(mean) and math.isfinite(norm)):
                    raise TrainingDiverged(
                        f"the loss became {mean} (gradient norm {norm}) by step {step}; the run "
                        f"stopped, the last good checkpoint is {latest_checkpoint(self.run_dir)}"
                    )
                now = time.perf_counter()
                rate = tokens_per_step * (step - logged_at) / max(now - logged_time, 1e-9)
                last_loss = mean
                record = {
                    "kind": "train",
                    "step": step,
                    "loss": mean,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens_per_s": rate,
                }
                if aux is not None:
                    record["aux_loss"] = float(dist.mean(aux))
                self._log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                logged_at, logged_time = step, now
            if step % cfg.eval_every == 0 or last:
                record = self._evaluate(step, bar)
                eval_loss = record.get("eval_loss", eval_loss)
                if self.early_stop is not None and self.early_stop(record):
                    stopped_early = stop = True
            if step % cfg.save_every == 0 or last or stop:
                self._save(step)
                saved_at = step
            if stop:
                break
        if bar is not None:
            bar.close()
        if dist.is_main and (self.run_dir / "metrics.jsonl").exists():
            plot_losses(
                self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", self.run_dir.name
            )
        return TrainResult(
            run_dir=self.run_dir,
            step=saved_at,
            loss=last_loss,
            eval_loss=eval_loss,
            tokens_per_s=rate,
            interrupted=self.stop_signal is not None,
            stopped_early=stopped_early,
        )

    def _step(self, step: int):
        """One optimizer step over the global batch; returns (loss, aux loss, grad norm,
        tokens in the global batch)."""
        cfg, dist = self.config.train, self.dist
        batch = self.data.batch(step, rank=dist.rank, world_size=dist.world_size)
        loss_total = torch.zeros((), device=dist.device)
        aux_total = None
        micro_batches = list(self._micro_batches(batch))
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1 or not hasattr(self.wrapped, "no_sync")
            context = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with context, self._autocast():
                loss = self.forward(
                    micro["input_ids"], labels=micro["labels"], cu_seqlens=micro.get("cu_seqlens")
                )
                total = loss
                aux = self.model.aux_loss
                if aux is not None:
                    total = total + cfg.aux_loss_coef * aux
                    aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
                (total / self.accumulation).backward()
            loss_total += loss.detach() / self.accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if aux_total is not None:
            aux_total = aux_total / self.accumulation
        return loss_total, aux_total, grad_norm, batch["input_ids"].numel() * dist.world_size

    def _micro_batches(self, batch: dict):
        """Split this process's rows into `accumulation` micro-batches (moved to the device)."""
        device, n = self.dist.device, self.accumulation
        if "cu_seqlens" not in batch:
            for i in range(n):
                rows = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
                yield {k: v[rows].to(device) for k, v in batch.items()}
            return
        # varlen: one packed row of whole windows; every window start is a boundary in
        # cu_seqlens, so each micro-batch's offsets are a contiguous run of them.
        span = self.micro_batch * self.config.data.seq_len
        cu = batch["cu_seqlens"].cpu()
        for i in range(n):
            lo, hi = i * span, (i + 1) * span
            inside = cu[(cu >= lo) & (cu <= hi)] - lo
            yield {
                "input_ids": batch["input_ids"][:, lo:hi].to(device),
                "labels": batch["labels"][:, lo:hi].to(device),
                "cu_seqlens": inside.to(device=device, dtype=torch.int32),
            }

    def _autocast(self):
        if self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- evaluation, samples, logs, checkpoints --------------------------------------------

    @torch.no_grad()
    def _evaluate(self, step: int, bar) -> dict:
        """Held-out loss (and the evaluator's metrics); logs and returns the eval record."""
        cfg, dist = self.config.train, self.dist
        self.model.eval()
        # Held-out batches of global_batch rows, each process taking its share (in
        # micro-batches), summed per token: the same number for any number of processes.
        total, count = torch.zeros((), device=dist.device), 0
        for i, batch in enumerate(self.data.eval_batches(cfg.global_batch)):
            if i == cfg.eval_batches:
                break
            rows = batch["input_ids"].shape[0]
            share = -(-rows // dist.world_size)
            lo, hi = dist.rank * share, min(rows, (dist.rank + 1) * share)
            for start in range(lo, hi, self.micro_batch):
                stop = min(hi, start + self.micro_batch)
                labels = batch["labels"][start:stop].to(dist.device)
                with self._autocast():
                    loss = self.forward(
                        batch["input_ids"][start:stop].to(dist.device), labels=labels
                    )
                n = int((labels != -100).sum())
                total += loss.float() * n
                count += n
        sums = dist.sum(torch.stack([total, torch.tensor(float(count), device=dist.device)]))
        record = {"kind": "eval", "step": step}
        if sums[1] > 0:
            record["eval_loss"] = float(sums[0] / sums[1])
            record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
        if self.evaluator is not None:
            record.update(self.evaluator(self.model))
        if len(record) > 2:
            self._log(record)
            if bar is not None:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
                bar.write(f"step {step}: {shown}")
        # Generation runs outside forward, where FSDP keeps the root's parameters sharded.
        if self.tokenizer is not None and (cfg.distributed != "fsdp" or dist.world_size == 1):
            self._sample(step, bar)
        self.model.train()
        return record

    def _sample(self, step: int, bar) -> None:
        cfg = self.config.train
        if cfg.sample_tokens <= 0:
            return
        prompt = torch.full((1, 1), self.tokenizer.eos_id, device=self.dist.device)
        generator = torch.Generator(device=self.dist.device).manual_seed(cfg.seed + step)
        with self._autocast():
            out = self.model.generate(
                prompt, cfg.sample_tokens, temperature=0.8, top_k=40, generator=generator
            )
        text = self.tokenizer.decode(out[0, 1:].tolist())
        self._log({"kind": "sample", "step": step, "text": text})
        if bar is not None:
            bar.write(f"step {step} sample: {text[:200]!r}")

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop records logged after the checkpoint: they will be logged again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= self.start_step]
        _atomic_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _save(self, step: int) -> None:
        model_state, optim_state = self.dist.full_state(self.wrapped, self.optimizer)
        if self.dist.is_main:
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_checkpoint(
                self.run_dir,
                step,
                model_state=model_state,
                train_state={
                    "optimizer": optim_state,
                    "rng": rng,
                    "data": self.data.state_dict(),
                },
                config=self.config.to_dict(),
                write_tokenizer=self.data.save,
                keep_last=self.config.train.keep_last,
            )
        self.dist.barrier()
