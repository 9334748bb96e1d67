"""Passkey retrieval: find a 5-digit key hidden at some depth of a long filler text.

The canonical prompt (Mohtashami & Jaggi 2023, "Landmark Attention", arXiv:2305.16300)::

    <eos>There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    it. I will quiz you about the important information there. The grass is green. The sky is
    blue. ... The pass key is 71432. Remember it. 71432 is the pass key. ... There and back
    again. What is the pass key? The pass key is 71432

Sequences are built in bytes (`memzoo.train.tokenizer.ByteTokenizer`, the vocabulary of the tiny
presets; the document follows `<eos>` = 256 as every document does in the training stream) for a
whole batch at once, as a pure function of (config, seed). The filler is whole sentences cycled
to length (extra spaces between sentences make up the last few bytes) with the key inserted at
the sentence boundary nearest the requested depth, or random lowercase letters ("noise") with
the key at the nearest byte. With `num_passes = 2` the document is written twice before the
question (JRT-Prompt: `document + "\\n" + document + question`), the same document and key as
the single pass.

Training (`PasskeyData`, the trainer's TrainingData) puts labels on the five digits only.
Evaluation scores the digits teacher-forced (one forward pass; all five argmaxes right is exactly
"greedy decoding writes the key") or, for any tokenizer, generates greedily and compares the first
number in the output with the key. `evaluate_lengths` fills an accuracy grid over lengths and
depths; `plot_passkey_heatmap` draws it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memzoo.train.tokenizer import ByteTokenizer, save_tokenizer

__all__ = [
    "PasskeyBatch",
    "PasskeyConfig",
    "PasskeyData",
    "PasskeyGrid",
    "PasskeyScore",
    "evaluate_lengths",
    "evaluate_passkey",
    "first_number",
    "min_seq_len",
    "passkey_batch",
    "passkey_evaluator",
    "plot_passkey_heatmap",
    "score_generated",
    "score_teacher_forced",
    "train_passkey",
    "write_passkey_results",
]

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
PASS_SEPARATOR = "\n"
NUM_DIGITS = 5
FILLERS = ("sentences", "noise")
MODES = ("teacher_forced", "generate")
NOISE_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", dtype=np.uint8)
IGNORE_INDEX = -100

_EOS = ByteTokenizer.eos_id
_ZERO = ord("0")
# The needle with placeholder digits, and where its two copies of the key start.
_NEEDLE_BYTES = np.frombuffer(NEEDLE.format(key="0" * NUM_DIGITS).encode(), dtype=np.uint8)
_NEEDLE_PARTS = NEEDLE.split("{key}")
_KEY_OFFSETS = (
    len(_NEEDLE_PARTS[0]),
    len(_NEEDLE_PARTS[0]) + NUM_DIGITS + len(_NEEDLE_PARTS[1]),
)
# Everything but the filler: <eos>, intro, needle, question, " " + the key.
_FIXED = 1 + len(INTRO) + len(_NEEDLE_BYTES) + len(QUESTION) + 1 + NUM_DIGITS


def _check_count(where: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")


def min_seq_len() -> int:
    """The shortest single-pass example (no filler at all): 249 tokens."""
    return _FIXED - 1


@dataclass(frozen=True)
class PasskeyConfig:
    """One passkey setting.

    seq_len: input tokens of the single-pass example (`input_ids` is `[B, seq_len]`; its last
        five labels are the key's digits); at least `min_seq_len()`.
    depth: fraction of the filler placed before the key, in [0, 1]; None draws it uniformly per
        example.
    filler: "sentences" (the canonical grass/sky/sun text) or "noise" (random lowercase letters
        and spaces, drawn per example).
    num_passes: copies of the document before the question; 2 is the JRT-Prompt. The filler,
        depth and key do not depend on it, so one seed gives the same document in both.
    """

    seq_len: int = 512
    depth: float | None = None
    filler: str = "sentences"
    num_passes: int = 1

    def __post_init__(self):
        _check_count("PasskeyConfig", "seq_len", self.seq_len, min_seq_len())
        depth_ok = isinstance(self.depth, (int, float)) and 0.0 <= self.depth <= 1.0
        if self.depth is not None and not depth_ok:
            raise ValueError(
                f"PasskeyConfig: depth must lie in [0, 1] or be None, got {self.depth!r}"
            )
        if self.filler not in FILLERS:
            raise ValueError(
                f"PasskeyConfig: filler must be one of {', '.join(FILLERS)}, got {self.filler!r}"
            )
        _check_count("PasskeyConfig", "num_passes", self.num_passes)

    @property
    def filler_len(self) -> int:
        """Bytes of filler in one document."""
        return self.seq_len - min_seq_len()

    @property
    def document_len(self) -> int:
        """Bytes of one document: intro, filler and needle."""
        return len(INTRO) + self.filler_len + len(_NEEDLE_BYTES)

    @property
    def total_len(self) -> int:
        """Input tokens of an example with `num_passes` copies of the document."""
        extra = (self.num_passes - 1) * (len(PASS_SEPARATOR) + self.document_len)
        return self.seq_len + extra


@dataclass
class PasskeyBatch:
    """B passkey examples of one config, as byte-level token ids.

    input_ids: `[B, T]` int64, T = config.total_len, starting with <eos>.
    labels: `[B, T]` int64, the next token at the last NUM_DIGITS positions (the key's digits),
        -100 elsewhere.
    keys: `[B]` int64, the 5-digit keys.
    depths: `[B]` float64, the fraction of the filler actually before the key.
    key_positions: `[B]` int64, index in input_ids of the key's first digit in the first
        document.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor
    depths: torch.Tensor
    key_positions: torch.Tensor

    @property
    def answer_positions(self) -> slice:
        """Positions whose labels are the digits (the logits there predict the key)."""
        T = self.input_ids.shape[1]
        return slice(T - NUM_DIGITS, T)

    def rows(self, start: int, stop: int) -> PasskeyBatch:
        """Examples start..stop-1."""
        return PasskeyBatch(
            *(t[start:stop] for t in (self.input_ids, self.labels, self.keys, self.depths)),
            self.key_positions[start:stop],
        )

    def prompts(self) -> list[str]:
        """The text of each prompt up to "The pass key is" (no <eos>, no trailing space)."""
        stop = self.input_ids.shape[1] - NUM_DIGITS
        return [bytes(row[1:stop].tolist()).decode() for row in self.input_ids]


def _digits(keys: np.ndarray) -> np.ndarray:
    """Keys `[B]` -> their ASCII digits `[B, 5]`, most significant first."""
    powers = 10 ** np.arange(NUM_DIGITS - 1, -1, -1)
    return (keys[:, None] // powers) % 10 + _ZERO


def _sentence_filler(n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` bytes of whole filler sentences, each after one or more spaces, and the sentence
    boundaries `[k + 1]` (where each sentence's spaces start, then n) where the key may go."""
    lengths, total = [], 0
    while total + 1 + len(SENTENCES[len(lengths) % len(SENTENCES)]) <= n:
        lengths.append(len(SENTENCES[len(lengths) % len(SENTENCES)]))
        total += 1 + lengths[-1]
    if not lengths:
        return np.full(n, ord(" "), dtype=np.uint8), np.array([0, n])
    # The bytes left over become extra spaces, spread over the gaps (a doubled space is
    # ordinary text; a sentence cut in half is not).
    spaces = np.full(len(lengths), 1) + np.bincount(
        np.arange(n - total) % len(lengths), minlength=len(lengths)
    )
    pieces, boundaries, at = [], [], 0
    for i, (gap, length) in enumerate(zip(spaces, lengths, strict=True)):
        boundaries.append(at)
        pieces.append(" " * gap + SENTENCES[i % len(SENTENCES)])
        at += gap + length
    boundaries.append(n)
    return np.frombuffer("".join(pieces).encode(), dtype=np.uint8), np.array(boundaries)


def _insert(filler: np.ndarray, needle: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Row b of filler `[B, n]` with needle `[B, N]` inserted before byte at[b]: `[B, n + N]`."""
    B, n = filler.shape
    N = needle.shape[1]
    if n == 0:
        return needle
    j = np.arange(n + N)[None, :]
    rel = j - at[:, None]
    in_needle = (rel >= 0) & (rel < N)
    source = np.clip(np.where(rel < 0, j, j - N), 0, n - 1)
    return np.where(
        in_needle,
        np.take_along_axis(needle, np.clip(rel, 0, N - 1), axis=1),
        np.take_along_axis(filler, source, axis=1),
    )


def passkey_batch(
    config: PasskeyConfig, batch_size: int, seed: int | Sequence[int] = 0
) -> PasskeyBatch:
    """`batch_size` passkey examples, a pure function of (config, batch_size, seed).

    seed: an int or a sequence of ints (numpy SeedSequence entropy), e.g. (seed, step).
    """
    _check_count("passkey_batch", "batch_size", batch_size)
    rng = np.random.default_rng(seed)
    B, n = batch_size, config.filler_len
    keys = rng.integers(10 ** (NUM_DIGITS - 1), 10**NUM_DIGITS, size=B)
    wanted = rng.random(B) if config.depth is None else np.full(B, float(config.depth))
    if config.filler == "noise":
        filler = NOISE_ALPHABET[rng.integers(0, len(NOISE_ALPHABET), size=(B, n))]
        at = np.rint(wanted * n).astype(np.int64)
    else:
        text, boundaries = _sentence_filler(n)
        filler = np.broadcast_to(text, (B, n))
        nearest = np.abs(boundaries[None, :] - wanted[:, None] * n).argmin(axis=1)
        at = boundaries[nearest]
    needle = np.tile(_NEEDLE_BYTES, (B, 1))
    digits = _digits(keys)
    for offset in _KEY_OFFSETS:
        needle[:, offset : offset + NUM_DIGITS] = digits
    intro = np.tile(np.frombuffer(INTRO.encode(), dtype=np.uint8), (B, 1))
    document = np.concatenate([intro, _insert(filler, needle, at)], axis=1).astype(np.int64)
    separator = np.full((B, len(PASS_SEPARATOR)), ord(PASS_SEPARATOR), dtype=np.int64)
    passes = [document, separator] * (config.num_passes - 1) + [document]
    question = np.tile(np.frombuffer((QUESTION + " ").encode(), dtype=np.uint8), (B, 1))
    sequence = np.concatenate(
        [np.full((B, 1), _EOS), *passes, question.astype(np.int64), digits], axis=1
    )
    input_ids = torch.from_numpy(sequence[:, :-1].copy())
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -NUM_DIGITS:] = torch.from_numpy(digits)
    depths = at / n if n else wanted
    return PasskeyBatch(
        input_ids=input_ids,
        labels=labels,
        keys=torch.from_numpy(keys.astype(np.int64)),
        depths=torch.from_numpy(np.asarray(depths, dtype=np.float64)),
        key_positions=torch.from_numpy(1 + len(INTRO) + at + _KEY_OFFSETS[0]),
    )


# ---- scoring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PasskeyScore:
    """exact_match: fraction of examples whose whole key came out (the headline; chance is
    1 / 90000); digit_accuracy: fraction of digits right (chance about 0.1)."""

    exact_match: float
    digit_accuracy: float
    num_examples: int


def _device_of(model) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return torch.device("cpu") if parameter is None else parameter.device


@torch.no_grad()
def score_teacher_forced(model, batch: PasskeyBatch) -> torch.Tensor:
    """Which digits the model gets right given the true earlier ones: `[B, 5]` bool.

    model: an `LM` over the byte vocabulary, or any module with model(input_ids `[B, T]`) ->
    logits `[B, T, V]`. A row is all True exactly when greedy decoding writes the whole key, so
    exact match needs no generation; the per-digit rate is the teacher-forced one.
    """
    ids = batch.input_ids.to(_device_of(model))
    answer = batch.answer_positions
    if hasattr(model, "hidden_states"):  # an LM: run the head only where the digits are due
        logits = model.logits(model.hidden_states(ids)[:, answer])
    else:
        logits = model(ids)[:, answer]
    predicted = logits.argmax(-1).cpu()
    return predicted == batch.labels[:, batch.answer_positions]


_NUMBER = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of digits in `text`, or None."""
    match = _NUMBER.search(text)
    return None if match is None else match.group()


@torch.no_grad()
def _greedy_continuations(
    model, prompts: list[list[int]], max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """model.generate(greedy) of each prompt; prompts of equal length share a batch."""
    device = _device_of(model)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            generated = model.generate(ids, max_new_tokens, greedy=True)[:, length:]
            for i, tokens in zip(chunk, generated.tolist(), strict=True):
                out[i] = tokens
    return out


def score_generated(
    model,
    tokenizer,
    prompts: Sequence[str],
    keys: Sequence[int],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of `<eos> + prompt`, scored against the keys.

    model: an `LM` (its `generate`); tokenizer: the model's (memzoo.train.tokenizer).
    Returns exact `[B]` bool (the first number of the continuation equals the key) and digits
    `[B, 5]` bool (that number's leading digits against the key's).
    """
    if len(prompts) != len(keys):
        raise ValueError(f"score_generated: {len(prompts)} prompts but {len(keys)} keys")
    encoded = [[tokenizer.eos_id, *tokenizer.encode(prompt)] for prompt in prompts]
    continuations = _greedy_continuations(model, encoded, max_new_tokens, batch_size)
    exact = torch.zeros(len(prompts), dtype=torch.bool)
    digits = torch.zeros(len(prompts), NUM_DIGITS, dtype=torch.bool)
    for b, (tokens, key) in enumerate(zip(continuations, keys, strict=True)):
        if tokenizer.eos_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_id)]
        number, key = first_number(tokenizer.decode(tokens)) or "", str(int(key))
        exact[b] = number == key
        for i in range(min(NUM_DIGITS, len(number))):
            digits[b, i] = number[i] == key[i]
    return exact, digits


def evaluate_passkey(
    model,
    config: PasskeyConfig,
    *,
    num_examples: int = 100,
    seed: int | Sequence[int] = 0,
    batch_size: int = 16,
    mode: str = "teacher_forced",
    tokenizer=None,
    max_new_tokens: int = 8,
) -> PasskeyScore:
    """Accuracy of `model` on `num_examples` passkey examples of `config`.

    mode "teacher_forced": one forward pass, byte vocabulary (see score_teacher_forced; a
    tokenizer other than the byte one is an error); "generate": greedy decoding through
    `tokenizer` (default ByteTokenizer), first number against the key. The examples depend on
    (config, num_examples, seed), not on batch_size.
    """
    if mode not in MODES:
        raise ValueError(f"evaluate_passkey: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "teacher_forced" and not isinstance(tokenizer, (ByteTokenizer, type(None))):
        raise ValueError(
            f"evaluate_passkey: teacher-forced scoring feeds byte ids, so it needs the byte "
            f"tokenizer, got a {tokenizer.name} one; use mode='generate'"
        )
    _check_count("evaluate_passkey", "num_examples", num_examples)
    _check_count("evaluate_passkey", "batch_size", batch_size)
    examples = passkey_batch(config, num_examples, seed)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        if mode == "teacher_forced":
            digits = torch.cat(
                [
                    score_teacher_forced(model, examples.rows(start, start + batch_size))
                    for start in range(0, num_examples, batch_size)
                ]
            )
            exact = digits.all(dim=1)
        else:
            exact, digits = score_generated(
                model,
                ByteTokenizer() if tokenizer is None else tokenizer,
                examples.prompts(),
                examples.keys.tolist(),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
    finally:
        if was_training:
            model.train()
    return PasskeyScore(
        exact_match=exact.float().mean().item(),
        digit_accuracy=digits.float().mean().item(),
        num_examples=num_examples,
    )


def _entropy(seed: int | Sequence[int]) -> tuple[int, ...]:
    return (seed,) if isinstance(seed, int) else tuple(seed)


# ---- the length x depth grid ----------------------------------------------------------------

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class PasskeyGrid:
    """Accuracy by length and depth: exact_match and digit_accuracy are `[len(lengths),
    len(depths)]` arrays; `extra` holds what else the JSON should say (checkpoint, mode ...)."""

    lengths: list[int]
    depths: list[float]
    exact_match: np.ndarray
    digit_accuracy: np.ndarray
    num_examples: int
    extra: dict = field(default_factory=dict)

    def by_length(self) -> dict[int, float]:
        """Exact match at each length, averaged over depths."""
        return {n: float(self.exact_match[i].mean()) for i, n in enumerate(self.lengths)}

    def to_dict(self) -> dict:
        return {
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "exact_match": self.exact_match.tolist(),
            "digit_accuracy": self.digit_accuracy.tolist(),
            "exact_match_by_length": {str(k): v for k, v in self.by_length().items()},
            "num_examples": self.num_examples,
            **self.extra,
        }


def evaluate_lengths(
    model,
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    *,
    num_examples: int = 50,
    seed: int | Sequence[int] = 0,
    batch_size: int = 16,
    filler: str = "sentences",
    num_passes: int = 1,
    mode: str = "teacher_forced",
    tokenizer=None,
    max_new_tokens: int = 8,
) -> PasskeyGrid:
    """evaluate_passkey at every (length, depth), `num_examples` each.

    Each cell has its own seed (seed, length, depth in millionths), so adding a length or a
    depth leaves the other cells' examples unchanged.
    """
    if not lengths or not depths:
        raise ValueError("evaluate_lengths: lengths and depths must be non-empty")
    exact = np.zeros((len(lengths), len(depths)))
    digits = np.zeros_like(exact)
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            config = PasskeyConfig(
                seq_len=int(length), depth=float(depth), filler=filler, num_passes=num_passes
            )
            score = evaluate_passkey(
                model,
                config,
                num_examples=num_examples,
                seed=(*_entropy(seed), int(length), round(depth * 10**6)),
                batch_size=batch_size,
                mode=mode,
                tokenizer=tokenizer,
                max_new_tokens=max_new_tokens,
            )
            exact[i, j], digits[i, j] = score.exact_match, score.digit_accuracy
    return PasskeyGrid(
        lengths=[int(n) for n in lengths],
        depths=[float(d) for d in depths],
        exact_match=exact,
        digit_accuracy=digits,
        num_examples=num_examples,
    )


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    """write(tmp) into a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def plot_passkey_heatmap(grid: PasskeyGrid, path: str | Path, title: str = "") -> Path:
    """Exact match by depth (rows) and length (columns) as an annotated PNG, written
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 * len(grid.lengths) + 2.5, 0.6 * len(grid.depths) + 1.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid.exact_match.T, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(len(grid.lengths)):
        for j in range(len(grid.depths)):
            ax.text(i, j, f"{grid.exact_match[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:.0%}" for d in grid.depths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title or f"passkey exact match ({grid.num_examples} examples per cell)")
    fig.colorbar(image, ax=ax, label="exact match")
    fig.tight_layout()
    return _atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def write_passkey_results(grid: PasskeyGrid, directory: str | Path, title: str = "") -> Path:
    """`passkey.json` and `passkey.png` in `directory`; returns the JSON's path."""
    directory = Path(directory)
    text = json.dumps(grid.to_dict(), indent=2)
    plot_passkey_heatmap(grid, directory / "passkey.png", title)
    return _atomic(directory / "passkey.json", lambda tmp: Path(tmp).write_text(text))


# ---- training -------------------------------------------------------------------------------


class PasskeyData:
    """The trainer's TrainingData for passkey at one length (memzoo.train.source).

    Global batch `step` is `passkey_batch(config, global_batch, (seed, 0, step))`, each process
    taking its contiguous share of rows; the held-out batches come from stream (seed, 1, i),
    `eval_examples` examples in all. Labels sit on the key's digits only.
    """

    tokenizer = ByteTokenizer()

    def __init__(
        self, config: PasskeyConfig, *, global_batch: int, seed: int = 0, eval_examples: int = 64
    ):
        _check_count("PasskeyData", "global_batch", global_batch)
        self.config, self.global_batch = config, global_batch
        self.seed, self.eval_examples = seed, eval_examples

    def batch(self, step: int, *, rank: int = 0, world_size: int = 1) -> dict:
        if self.global_batch % world_size:
            raise ValueError(
                f"PasskeyData: global_batch={self.global_batch} does not split into "
                f"{world_size} processes"
            )
        share = self.global_batch // world_size
        batch = passkey_batch(self.config, self.global_batch, (self.seed, 0, step))
        rows = slice(rank * share, (rank + 1) * share)
        return {"input_ids": batch.input_ids[rows], "labels": batch.labels[rows]}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for i, start in enumerate(range(0, self.eval_examples, batch_size)):
            size = min(batch_size, self.eval_examples - start)
            batch = passkey_batch(self.config, size, (self.seed, 1, i))
            yield {"input_ids": batch.input_ids, "labels": batch.labels}

    def save(self, directory: Path) -> None:
        save_tokenizer(self.tokenizer, directory)

    def state_dict(self) -> dict:
        return {"task": "passkey", **asdict(self.config), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise ValueError(
                f"PasskeyData: the checkpoint was trained on {state}, not {self.state_dict()}"
            )


def passkey_evaluator(
    config: PasskeyConfig, *, num_examples: int = 64, seed: int = 0, batch_size: int = 16
) -> Callable[[torch.nn.Module], dict]:
    """For Trainer(evaluator=...): exact match and digit accuracy on a fixed set (stream
    (seed, 2), apart from the training and held-out examples)."""

    def evaluate(model) -> dict:
        score = evaluate_passkey(
            model, config, num_examples=num_examples, seed=(seed, 2), batch_size=batch_size
        )
        return {"passkey_exact": score.exact_match, "passkey_digits": score.digit_accuracy}

    return evaluate


def train_passkey(
    run_config,
    passkey: PasskeyConfig,
    *,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEPTHS,
    num_examples: int = 50,
    device=None,
):
    """Train `run_config.model` on passkey at length L = passkey.seq_len with the shared
    trainer, then evaluate at `lengths` (default L, 2L, 4L, 8L) and `depths`.

    run_config: a memzoo.train.config.RunConfig; the task provides the data, so of its data
    section only seq_len is touched (set to L, so the saved config says what was trained).
    Writes passkey.json and passkey.png into the run directory. Returns (TrainResult,
    PasskeyGrid).
    """
    from memzoo.train.trainer import Trainer

    run_config.data.seq_len = passkey.seq_len
    train = run_config.train
    batch_size = train.micro_batch or train.global_batch
    data = PasskeyData(passkey, global_batch=train.global_batch, seed=train.seed)
    trainer = Trainer(
        run_config,
        device=device,
        data=data,
        evaluator=passkey_evaluator(passkey, seed=train.seed, batch_size=batch_size),
    )
    try:
        result = trainer.run()
        grid = evaluate_lengths(
            trainer.model,
            lengths or [passkey.seq_len * k for k in (1, 2, 4, 8)],
            depths,
            num_examples=num_examples,
            seed=(train.seed, 3),
            batch_size=batch_size,
            filler=passkey.filler,
            num_passes=passkey.num_passes,
        )
        grid.extra["train_length"] = passkey.seq_len
        if trainer.dist.is_main:
            write_passkey_results(
                grid, result.run_dir, f"passkey, trained at {passkey.seq_len} tokens"
            )
    finally:
        trainer.dist.close()
    return result, grid
