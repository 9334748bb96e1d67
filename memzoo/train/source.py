"""What the trainer reads: a `TrainingData` gives the batch of every step and the held-out
batches. `CorpusData` is the default (text or token files through a tokenizer); synthetic tasks
(memzoo.eval.mqar) provide their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from memzoo.train.config import DataConfig
from memzoo.train.data import (
    PackedBatches,
    build_token_stream,
    eval_batches,
    is_token_file,
    load_documents,
    load_token_file,
    split_heldout,
)
from memzoo.train.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

__all__ = ["CorpusData", "TrainingData"]


class TrainingData(Protocol):
    """The trainer's view of its data.

    batch(step, rank, world_size): this process's share of global batch `step`, a dict with
        `input_ids` and `labels` `[b, T]` int64 (labels already shifted; -100 = ignored) and
        optionally `cu_seqlens`; a pure function of the step, so resuming is exact.
    eval_batches(batch_size): the held-out batches, in a fixed order (may be empty).
    tokenizer: a memzoo tokenizer for sample generations, or None.
    save(directory): write what a checkpoint needs to decode (the tokenizer), or nothing.
    state_dict / load_state_dict: identify the data, so a resume on other data is an error.
    """

    tokenizer: object | None

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> dict: ...

    def eval_batches(self, batch_size: int) -> Iterator[dict]: ...

    def save(self, directory: Path) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CorpusData:
    """A corpus (data.source) through a tokenizer, packed into windows of seq_len + 1 tokens.

    tokenizer: an existing tokenizer (a resumed run's), or None to build one from data.tokenizer.
    """

    def __init__(self, data: DataConfig, *, global_batch: int, seed: int, tokenizer=None):
        self.tokenizer = tokenizer
        if tokenizer is None:
            self.tokenizer = build_tokenizer(
                data.tokenizer,
                lambda: load_documents(data.source, text_field=data.text_field),
                data.vocab_size,
            )
        if is_token_file(data.source):
            tokens = load_token_file(data.source)
        else:
            documents = load_documents(data.source, text_field=data.text_field)
            tokens = build_token_stream(documents, self.tokenizer)
        self.heldout = None
        if data.heldout > 0:
            tokens, self.heldout = split_heldout(
                tokens, data.heldout, self.tokenizer.eos_id, seq_len=data.seq_len
            )
        self.seq_len = data.seq_len
        self.packed = PackedBatches(
            tokens,
            data.seq_len,
            global_batch,
            seed=seed,
            eos_id=self.tokenizer.eos_id,
            varlen=data.varlen,
        )

    @classmethod
    def from_directory(cls, data: DataConfig, directory: Path, **kwargs) -> CorpusData:
        """Reuse the tokenizer saved in `directory` (a run or checkpoint directory)."""
        return cls(data, tokenizer=load_tokenizer(directory / "tokenizer.json"), **kwargs)

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> dict:
        return self.packed.batch(step, rank=rank, world_size=world_size)

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        if self.heldout is None:
            return iter(())
        return eval_batches(self.heldout, self.seq_len, batch_size)

    def save(self, directory: Path) -> None:
        save_tokenizer(self.tokenizer, directory)

    def state_dict(self) -> dict:
        return self.packed.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict(state)
