"""Training data: documents from a source, one token stream, and the batches cut from it.

    documents = load_documents("builtin")               # a file, a directory, "hf:<path>" ...
    tokens = build_token_stream(documents, tokenizer)   # uint16/uint32, eos after every document
    train, heldout = split_heldout(tokens, 0.02, tokenizer.eos_id, seq_len=256)
    batches = PackedBatches(train, 256, 16, seed=0, eos_id=tokenizer.eos_id)
    batch = batches.batch(step, rank=rank, world_size=world_size)   # a pure function of step
    for batch in eval_batches(heldout, 256, 16): ...

A large corpus is tokenized once into a token file (`save_token_file`) and memory-mapped
(`load_token_file`): batches read only the windows they use, never the whole file.

Because `PackedBatches.batch(step)` depends on nothing but the seed and the step, the data
position of a checkpoint is its step: a resumed run, on any number of processes, reads exactly
the batches the first run would have read next.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memzoo.train.tokenizer import Tokenizer

__all__ = [
    "PackedBatches",
    "build_token_stream",
    "eval_batches",
    "is_token_file",
    "load_documents",
    "load_token_file",
    "save_token_file",
    "split_heldout",
]

BUILTIN_SOURCES = ("builtin", "pydoc")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIX = ".jsonl"
TOKEN_FILE_SUFFIXES = (".bin", ".npy")
TOKEN_DTYPES = ("uint16", "uint32")
IGNORE_INDEX = -100

# Documents handed to the tokenizer at once (BPE encodes a group in parallel) and tokens read
# at once when searching a memory-mapped stream for a document boundary.
_ENCODE_GROUP = 256
_SCAN_TOKENS = 1 << 20


# --------------------------------------------------------------------------------------
# Sources -> documents
# --------------------------------------------------------------------------------------


def is_token_file(source: str | Path) -> bool:
    """Whether a data source names a pre-tokenized token file (.bin or .npy)."""
    return Path(source).suffix in TOKEN_FILE_SUFFIXES


def load_documents(source: str, *, text_field: str = "text") -> Iterator[str]:
    """The documents of a text source, in a fixed order, as an iterator of strings.

    source:
        "builtin" (or "pydoc"): Python's own documentation (`pydoc_data.topics`, ~465 kB, no
            download), one document per topic in sorted topic order;
        a directory: every *.txt, *.md, *.rst and *.jsonl file below it, in sorted path order;
        a .jsonl file: one document per line, the line's `text_field` string;
        any other file: the whole file is one document (UTF-8, bad bytes become U+FFFD);
        "hf:<path>": a Hugging Face dataset written by `save_to_disk` (its "train" split when
            it holds several), the `text_field` column.
    Empty documents are skipped. A missing path is a FileNotFoundError; a directory without
    text files, a token file, a .jsonl line without a `text_field` string (naming file and line)
    and a source that yields no text at all are ValueErrors.
    """
    if source in BUILTIN_SOURCES:
        return _nonempty(_builtin_documents(), source)
    if source.startswith("hf:"):
        return _nonempty(_hf_documents(source[len("hf:") :], text_field), source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or directory")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and _is_text_file(p)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise ValueError(
                f"data source {path}: a directory with no .txt, .md, .rst or .jsonl files"
            )
    elif is_token_file(path):
        raise ValueError(f"data source {path} is a token file: read it with load_token_file")
    else:
        files = [path]
    return _nonempty(_file_documents(files, text_field), source)


def _is_text_file(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.suffix == JSONL_SUFFIX


def _nonempty(documents: Iterable[str], source: str) -> Iterator[str]:
    found = False
    for document in documents:
        if document:
            found = True
            yield document
    if not found:
        raise ValueError(f"data source {source!r} holds no text")


def _builtin_documents() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise ImportError(
            "the builtin corpus is Python's pydoc_data.topics, which this Python installation "
            "lacks; give a text file or directory as the data source"
        ) from err
    return (topics[name] for name in sorted(topics))


def _hf_documents(path: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"data source 'hf:{path}' needs the `datasets` package: pip install datasets"
        ) from err
    if not Path(path).exists():
        raise FileNotFoundError(f"data source 'hf:{path}': no such directory")
    dataset = datasets.load_from_disk(path)
    # load_from_disk returns a DatasetDict (a dict of splits) for a saved DatasetDict.
    if isinstance(dataset, dict):
        if "train" not in dataset:
            raise ValueError(
                f"data source 'hf:{path}' holds splits {sorted(dataset)} and no 'train' split"
            )
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        raise ValueError(
            f"data source 'hf:{path}' has no column {text_field!r}; columns: "
            f"{', '.join(dataset.column_names)}"
        )
    return _hf_texts(dataset, path, text_field)


def _hf_texts(dataset: Any, path: str, text_field: str) -> Iterator[str]:
    row = 0
    for rows in dataset.iter(batch_size=1024):
        for text in rows[text_field]:
            if not isinstance(text, str):
                raise ValueError(
                    f"data source 'hf:{path}': row {row} has {text_field}={text!r}, not a string"
                )
            row += 1
            yield text


def _file_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        if file.suffix == JSONL_SUFFIX:
            yield from _jsonl_documents(file, text_field)
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8", errors="replace") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}, line {line_no}: not valid JSON ({err})") from err
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}, line {line_no}: no string field {text_field!r}")
            yield text


# --------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check_token_dtype(dtype: Any, what: str) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{what}: dtype must be uint16 or uint32, got {dtype!r}") from err
    if dtype.name not in TOKEN_DTYPES:
        raise ValueError(f"{what}: dtype must be uint16 or uint32, got {dtype.name}")
    return dtype


def _replace_into(path: Path, write) -> None:
    """Run `write(file)` on a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_token_file(path: str | Path, tokens: np.ndarray) -> Path:
    """Write a 1-D uint16/uint32 token array to `path`, atomically, and return the path.

    A .bin file holds the raw tokens and a sidecar `<path>.json` `{"dtype": ...}`; a .npy file
    is numpy's own format. `load_token_file` reads either back memory-mapped.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    _check_token_dtype(tokens.dtype, f"save_token_file({path})")
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(
            f"save_token_file({path}): tokens must be a non-empty 1-D array, got shape "
            f"{tokens.shape}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        _replace_into(path, tokens.tofile)
        sidecar = json.dumps({"dtype": tokens.dtype.name}).encode()
        _replace_into(_sidecar(path), lambda f: f.write(sidecar))
    elif path.suffix == ".npy":
        _replace_into(path, lambda f: np.save(f, tokens))
    else:
        raise ValueError(f"save_token_file: {path} must end in .bin or .npy")
    return path


def load_token_file(path: str | Path, dtype: Any = None) -> np.ndarray:
    """Memory-map a token file: 1-D uint16 or uint32, documents separated by the eos id.

    path: a .npy file, or a raw .bin file whose dtype is `dtype` or, if that is None, the
        "dtype" of its sidecar `<path>.json`. When both are given they must agree.
    Returns a read-only memory-mapped array; nothing is read until it is indexed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    what = f"token file {path}"
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        _check_token_dtype(tokens.dtype, what)
        if dtype is not None and _check_token_dtype(dtype, what) != tokens.dtype:
            raise ValueError(f"{what} holds {tokens.dtype.name}, not {np.dtype(dtype).name}")
        if tokens.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tokens.shape}")
        return tokens
    if path.suffix != ".bin":
        raise ValueError(f"{what}: token files end in .bin or .npy")
    dtype = _bin_dtype(path, dtype)
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise ValueError(f"{what} has {size} bytes, not a whole number of {dtype.name} tokens")
    return np.memmap(path, dtype=dtype, mode="r")


def _bin_dtype(path: Path, dtype: Any) -> np.dtype:
    what = f"token file {path}"
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        if dtype is None:
            raise ValueError(f"{what}: no dtype given and no sidecar {sidecar} to read it from")
        return _check_token_dtype(dtype, what)
    try:
        recorded = json.loads(sidecar.read_text())["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f'{sidecar} must hold {{"dtype": "uint16" | "uint32"}}') from err
    recorded = _check_token_dtype(recorded, str(sidecar))
    if dtype is not None and _check_token_dtype(dtype, what) != recorded:
        raise ValueError(f"{what}: dtype {np.dtype(dtype).name} given, {sidecar} says {recorded}")
    return recorded


# --------------------------------------------------------------------------------------
# The token stream
# --------------------------------------------------------------------------------------


def build_token_stream(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenize every document and concatenate them, each followed by `tokenizer.eos_id`.

    Returns a 1-D array, uint16 when every id fits (vocab_size <= 65536), else uint32.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    documents = iter(documents)
    pieces = []
    while group := list(islice(documents, _ENCODE_GROUP)):
        ids: list[int] = []
        for encoded in tokenizer.encode_batch(group):
            ids.extend(encoded)
            ids.append(tokenizer.eos_id)
        pieces.append(np.array(ids, dtype=dtype))
    if not pieces:
        raise ValueError("build_token_stream: no documents")
    return np.concatenate(pieces)


def split_heldout(
    tokens: np.ndarray, fraction: float, eos_id: int, *, seq_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into (train, heldout) views at a document boundary near the end.

    tokens: [N] with every document ended by `eos_id`. The cut is the last document start
    that holds out at least ceil(fraction * N) tokens; if there is none, the first document
    start after that point. With `seq_len`, each part must hold at least one window of
    seq_len + 1 tokens (one training or evaluation sequence). fraction == 0 gives an empty
    heldout part. A stream with no document start that leaves both parts big enough is a
    ValueError.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"split_heldout: fraction must lie in [0, 1), got {fraction}")
    n = len(tokens)
    if fraction == 0:
        return tokens, tokens[:0]
    least = 1 if seq_len is None else seq_len + 1
    target = n - math.ceil(fraction * n)
    cut = _last_doc_start(tokens, eos_id, least, min(target, n - least))
    if cut is None:
        cut = _first_doc_start(tokens, eos_id, max(least, target + 1), n - least)
    if cut is None:
        raise ValueError(
            f"split_heldout: a stream of {n} tokens has no document boundary that leaves at "
            f"least {least} tokens on each side; use more data, fewer documents per token or "
            "a shorter seq_len"
        )
    return tokens[:cut], tokens[cut:]


def _last_doc_start(tokens: np.ndarray, eos_id: int, lo: int, hi: int) -> int | None:
    """The largest c in [lo, hi] (lo >= 1) with tokens[c - 1] == eos_id, or None.

    Scans backwards in bounded chunks so a memory-mapped stream is read only near the cut.
    """
    end = hi
    while end >= lo:
        begin = max(lo, end - _SCAN_TOKENS + 1)
        hits = np.flatnonzero(tokens[begin - 1 : end] == eos_id)
        if hits.size:
            return begin + int(hits[-1])
        end = begin - 1
    return None


def _first_doc_start(tokens: np.ndarray, eos_id: int, lo: int, hi: int) -> int | None:
    """The smallest c in [lo, hi] (lo >= 1) with tokens[c - 1] == eos_id, or None."""
    begin = lo
    while begin <= hi:
        end = min(hi, begin + _SCAN_TOKENS - 1)
        hits = np.flatnonzero(tokens[begin - 1 : end] == eos_id)
        if hits.size:
            return begin + int(hits[0])
        begin = end + 1
    return None


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def _windows(tokens: np.ndarray, window_ids: np.ndarray, length: int) -> np.ndarray:
    """Windows [len(window_ids), length] int64; each is one contiguous read of the stream."""
    rows = [tokens[w * length : (w + 1) * length] for w in window_ids.tolist()]
    return np.stack(rows).astype(np.int64)


def _as_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
    }


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_stream(tokens: Any, what: str) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise TypeError(f"{what}: tokens must be a 1-D numpy array, got {type(tokens).__name__}")


class PackedBatches:
    """Training batches cut from a token stream: a pure function of (seed, step).

    The stream is cut into `num_windows` non-overlapping windows of seq_len + 1 tokens (a
    trailing remainder is unused); a window gives inputs window[:-1] and labels window[1:].
    Epoch e visits every window once, in the order np.random.default_rng(seed + e)
    .permutation(num_windows); global batch `step` is windows [step * G, (step + 1) * G) of those
    epoch orders laid end to end (G = global_batch), so a batch may straddle two epochs.

    tokens: [N] uint16/uint32 (a memory-mapped token file is read window by window).
    varlen: pack each process's rows into one row and mark document starts in cu_seqlens, so
        no document attends to another (see `batch`).
    A stream with fewer than `global_batch` windows is a ValueError.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        *,
        seed: int,
        eos_id: int,
        varlen: bool = False,
    ):
        _check_stream(tokens, "PackedBatches")
        _check_positive(seq_len=seq_len, global_batch=global_batch)
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.eos_id = eos_id
        self.varlen = varlen
        self.num_windows = len(tokens) // (seq_len + 1)
        if self.num_windows < 1:
            raise ValueError(
                f"PackedBatches: a stream of {len(tokens)} tokens is shorter than one window of "
                f"seq_len + 1 = {seq_len + 1} tokens"
            )
        if self.num_windows < global_batch:
            raise ValueError(
                f"PackedBatches: a stream of {len(tokens)} tokens gives {self.num_windows} "
                f"windows of seq_len + 1 = {seq_len + 1} tokens, fewer than global_batch = "
                f"{global_batch}; use more data, a shorter seq_len or a smaller batch"
            )
        self.steps_per_epoch = self.num_windows // global_batch
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        # A batch touches at most two epochs; keeping the two newest orders means each
        # permutation is drawn once per epoch.
        if epoch not in self._orders:
            if len(self._orders) == 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(
                self.num_windows
            )
        return self._orders[epoch]

    def window_indices(self, step: int) -> np.ndarray:
        """The windows of global batch `step`: [global_batch] int64 indices into the stream's
        windows (window w is tokens[w * (seq_len + 1) : (w + 1) * (seq_len + 1)])."""
        if step < 0:
            raise ValueError(f"PackedBatches: step must be >= 0, got {step}")
        position = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, offsets = np.divmod(position, self.num_windows)
        indices = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            indices[here] = self._order(epoch)[offsets[here]]
        return indices

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """This process's share of global batch `step`.

        Rank r takes the contiguous rows [r * b, (r + 1) * b) of the global batch, b =
        global_batch / world_size, so the ranks' batches concatenated in rank order are the
        world_size = 1 batch.

        Returns input_ids and labels [b, seq_len] int64 (labels are the inputs shifted by one).
        With varlen: input_ids and labels [1, b * seq_len] and cu_seqlens [S + 1] int32, the
        start of every window and of every document (the token after an eos), then the total
        length; the label of every eos position (the next document's first token) is -100.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedBatches: rank must lie in [0, {world_size}), got {rank}")
        if self.global_batch % world_size:
            raise ValueError(
                f"PackedBatches: global_batch = {self.global_batch} does not divide into "
                f"world_size = {world_size} equal shares"
            )
        rows = self.global_batch // world_size
        mine = self.window_indices(step)[rank * rows : (rank + 1) * rows]
        batch = _as_batch(_windows(self.tokens, mine, self.seq_len + 1))
        return self._pack(batch) if self.varlen else batch

    def _pack(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"].reshape(1, -1)
        labels = batch["labels"].reshape(1, -1).clone()
        is_eos = input_ids[0] == self.eos_id
        labels[0, is_eos] = IGNORE_INDEX
        total = input_ids.shape[1]
        window_starts = torch.arange(0, total, self.seq_len)
        doc_starts = torch.nonzero(is_eos[:-1]).flatten() + 1
        starts = torch.unique(torch.cat([window_starts, doc_starts]))
        cu_seqlens = torch.cat([starts, torch.tensor([total])]).to(torch.int32)
        return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu_seqlens}

    def state_dict(self) -> dict[str, int]:
        """What fixes the batch of every step; with the step it is the whole data position."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Check that a checkpoint's data state matches this stream (there is nothing to
        restore); a mismatch is a ValueError, since the resumed run would read other data."""
        mine = self.state_dict()
        if set(state) != set(mine):
            raise ValueError(
                f"PackedBatches.load_state_dict: expected keys {sorted(mine)}, got {sorted(state)}"
            )
        differ = [
            f"{k} = {state[k]!r} there, {mine[k]!r} here" for k in mine if state[k] != mine[k]
        ]
        if differ:
            raise ValueError(
                "PackedBatches.load_state_dict: the checkpoint was trained on other batches ("
                + "; ".join(differ)
                + "); resuming would silently read different data"
            )


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The windows of a (held-out) stream in order, batch_size at a time.

    Yields input_ids and labels [b, seq_len] int64 with b = batch_size (the last batch may be
    smaller); windows are the same non-overlapping seq_len + 1 token windows as in training.
    A stream shorter than one window is a ValueError.
    """
    _check_stream(tokens, "eval_batches")
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    num_windows = len(tokens) // (seq_len + 1)
    if num_windows < 1:
        raise ValueError(
            f"eval_batches: a stream of {len(tokens)} tokens is shorter than one window of "
            f"seq_len + 1 = {seq_len + 1} tokens"
        )
    return _eval_batches(tokens, seq_len + 1, batch_size, num_windows)


def _eval_batches(
    tokens: np.ndarray, length: int, batch_size: int, num_windows: int
) -> Iterator[dict[str, torch.Tensor]]:
    for first in range(0, num_windows, batch_size):
        window_ids = np.arange(first, min(first + batch_size, num_windows))
        yield _as_batch(_windows(tokens, window_ids, length))
