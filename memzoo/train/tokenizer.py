"""Tokenizers: UTF-8 bytes (no training, no files) or byte-level BPE, and their tokenizer.json.

Both share one small interface (`Tokenizer`): `encode(text) -> list[int]` adds no special
tokens, `decode(ids) -> str` drops them, and `eos_id` is the document separator that the token
stream puts after every document. A run saves its tokenizer next to its checkpoints
(`save_tokenizer`) and a later run or an evaluation reads it back (`load_tokenizer`)::

    tok = build_tokenizer("bpe", lambda: load_documents("builtin"), vocab_size=4096)
    save_tokenizer(tok, "runs/demo")          # runs/demo/tokenizer.json
    tok = load_tokenizer("runs/demo")
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    """What the data pipeline and the trainer use of a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """The UTF-8 bytes of the text: ids 0..255, then four special ids.

    256 `<|endoftext|>` (eos, ends every document), 257 `<|pad|>`, 258 `<|bos|>`, 259 `<|unk|>`
    (reserved, never produced); `vocab_size` is 260, the vocabulary of the tiny LM presets.
    """

    name = "byte"
    eos_id = 256
    pad_id = 257
    bos_id = 258
    unk_id = 259
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids in [0, 256); no special tokens are added."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids; special ids are dropped and invalid UTF-8 becomes U+FFFD.

        An id outside [0, vocab_size) is a ValueError.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {bad[:8]}"
            )
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "the BPE tokenizer needs the `tokenizers` package: pip install tokenizers"
        ) from err
    return tokenizers


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` behind the `Tokenizer` interface.

    `eos_id` is the id of `<|endoftext|>` (required); `pad_id` that of `<|pad|>`, or `eos_id`
    when a loaded tokenizer has no pad token. Special tokens are never matched inside text, so
    a document that quotes "<|endoftext|>" is encoded as its characters and cannot split itself
    in two.
    """

    name = "bpe"

    def __init__(self, tokenizer: Any):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"BPETokenizer: the tokenizer has no {EOS_TOKEN} token")
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE of at most `vocab_size` ids on `texts` (offline, in memory).

        Ids 0 and 1 are `<|endoftext|>` and `<|pad|>`, then the 256 byte symbols, then merges;
        a small corpus may run out of merges before `vocab_size`. vocab_size must be >= 258.
        """
        tk = _import_tokenizers()
        specials = [EOS_TOKEN, PAD_TOKEN]
        alphabet = tk.pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(specials) + len(alphabet):
            raise ValueError(
                f"BPETokenizer.train: vocab_size must be >= {len(specials) + len(alphabet)} "
                f"(2 special tokens + 256 bytes), got {vocab_size}"
            )
        tokenizer = tk.Tokenizer(tk.models.BPE())
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Read a Hugging Face tokenizer.json (or a directory holding one)."""
        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise ValueError(f"{path} holds a {tok.name} tokenizer, not a BPE one")
        return tok

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`; no special tokens are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by the tokenizers library."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        """The Hugging Face tokenizer.json text."""
        return self.tokenizer.to_str()


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a crash mid-write
    never leaves a truncated tokenizer.json under the real name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write `<directory>/tokenizer.json` (creating the directory) and return its path.

    The byte tokenizer is saved as `{"type": "byte"}`, a BPE tokenizer as its Hugging Face JSON.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    if isinstance(tok, ByteTokenizer):
        text = json.dumps({"type": ByteTokenizer.name})
    elif isinstance(tok, BPETokenizer):
        text = tok.to_json()
    else:
        raise TypeError(f"save_tokenizer: expected a ByteTokenizer or BPETokenizer, got {tok!r}")
    _atomic_write(path, text)
    return path


def load_tokenizer(path: str | Path) -> ByteTokenizer | BPETokenizer:
    """Read a tokenizer saved by `save_tokenizer`, or any Hugging Face tokenizer.json.

    path: a directory holding tokenizer.json, or the file itself. A missing file is a
    FileNotFoundError and an unreadable one a ValueError, both naming the path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if content == {"type": ByteTokenizer.name}:
        return ByteTokenizer()
    tk = _import_tokenizers()
    try:
        tokenizer = tk.Tokenizer.from_str(text)
    except Exception as err:
        raise ValueError(f"{path} is not a tokenizer file: {err}") from err
    try:
        return BPETokenizer(tokenizer)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def build_tokenizer(
    spec: str,
    texts_for_training: Callable[[], Iterable[str]] | None = None,
    vocab_size: int | None = None,
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a run asks for.

    spec: "byte"; "bpe", trained on `texts_for_training()` (the run's own corpus) to at most
        `vocab_size` ids; or a path to a tokenizer.json (or a directory holding one).
    vocab_size: required for "bpe"; for the others, when given, it must equal the tokenizer's
        own vocabulary, so a config cannot silently ask for a size it does not get.
    """
    if spec == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer 'bpe' is trained on the corpus: it needs a vocab_size")
        if texts_for_training is None:
            raise ValueError("tokenizer 'bpe' is trained on the corpus: it needs its texts")
        return BPETokenizer.train(texts_for_training(), vocab_size)
    if spec == "byte":
        tok = ByteTokenizer()
    elif Path(spec).exists():
        tok = load_tokenizer(spec)
    else:
        raise ValueError(
            f"tokenizer {spec!r}: expected 'byte', 'bpe' or the path of a tokenizer.json, "
            f"and {spec} does not exist"
        )
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(
            f"tokenizer {spec!r} has {tok.vocab_size} ids but vocab_size={vocab_size} was asked "
            "for; leave vocab_size unset to take the tokenizer's"
        )
    return tok
