"""The examples behind memzoo's lm-eval tasks: JSONL files, and the loader the YAMLs name.

`write_task_data(data_dir)` writes one JSONL file per task (`TASK_FILES`), a pure function of
its arguments; the single-pass and JRT files of a task come from one seed, so they hold the same
documents and questions. `load_task_data` is the tasks' `custom_dataset`: lm-eval calls it with
the run's metadata (`data_dir`) and the task's dataset_kwargs (`file`). lm-eval loads this file
by path (`!function data.load_task_data`), so it imports memzoo absolutely.

Records:
    passkey: {"prompt": "...The pass key is", "key": "71432", "length": 512, "depth": 0.43}
    mqar:    {"prompt": "kfq 417, pzb 902, ... pzb", "choices": ["417", "902", ...], "gold": 1}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memzoo.eval.passkey import PASS_SEPARATOR, PasskeyConfig, passkey_batch

__all__ = ["TASK_FILES", "load_task_data", "mqar_records", "passkey_records", "write_task_data"]

TASK_FILES = {
    "memzoo_passkey": "memzoo_passkey.jsonl",
    "memzoo_passkey_jrt": "memzoo_passkey_jrt.jsonl",
    "memzoo_mqar": "memzoo_mqar.jsonl",
    "memzoo_mqar_jrt": "memzoo_mqar_jrt.jsonl",
}
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def passkey_records(
    lengths: Sequence[int], num_examples: int, seed: int, *, num_passes: int = 1
) -> list[dict]:
    """`num_examples` passkey prompts per length, key at a uniformly random depth."""
    records = []
    for length in lengths:
        config = PasskeyConfig(seq_len=int(length), num_passes=num_passes)
        batch = passkey_batch(config, num_examples, (seed, int(length)))
        for prompt, key, depth in zip(
            batch.prompts(), batch.keys.tolist(), batch.depths.tolist(), strict=True
        ):
            records.append(
                {"prompt": prompt, "key": str(key), "length": int(length), "depth": depth}
            )
    return records


def mqar_records(
    num_examples: int, num_kv_pairs: int, seed: int, *, num_passes: int = 1
) -> list[dict]:
    """Associative recall in text: `num_kv_pairs` pairs of a distinct 3-letter key and a
    distinct 3-digit value, then one key; the choices are the context's values."""
    if not 1 <= num_kv_pairs <= 900:
        raise ValueError(f"mqar_records: num_kv_pairs must lie in [1, 900], got {num_kv_pairs}")
    rng = np.random.default_rng((seed, 1))
    records = []
    for _ in range(num_examples):
        codes = rng.choice(26**3, size=num_kv_pairs, replace=False)
        keys = ["".join(_LETTERS[[c // 676, c // 26 % 26, c % 26]]) for c in codes]
        values = [str(v) for v in 100 + rng.choice(900, size=num_kv_pairs, replace=False)]
        gold = int(rng.integers(num_kv_pairs))
        context = ", ".join(f"{k} {v}" for k, v in zip(keys, values, strict=True)) + "."
        document = PASS_SEPARATOR.join([context] * num_passes)
        records.append({"prompt": f"{document} {keys[gold]}", "choices": values, "gold": gold})
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """Written to a temporary file beside `path`, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_task_data(
    data_dir: str | Path,
    *,
    seed: int = 0,
    num_examples: int = 50,
    passkey_lengths: Sequence[int] = (512,),
    num_kv_pairs: int = 8,
) -> dict[str, Path]:
    """Write every task's JSONL into `data_dir` (created); returns {task: path}.

    num_examples: passkey prompts per length, and MQAR questions.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"write_task_data: num_examples must be an int >= 1, got {num_examples!r}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    records = {
        "memzoo_passkey": passkey_records(passkey_lengths, num_examples, seed),
        "memzoo_passkey_jrt": passkey_records(passkey_lengths, num_examples, seed, num_passes=2),
        "memzoo_mqar": mqar_records(num_examples, num_kv_pairs, seed),
        "memzoo_mqar_jrt": mqar_records(num_examples, num_kv_pairs, seed, num_passes=2),
    }
    paths = {}
    for task, rows in records.items():
        paths[task] = data_dir / TASK_FILES[task]
        _write_jsonl(paths[task], rows)
    return paths


def load_task_data(data_dir: str | None = None, file: str | None = None, **_metadata):
    """A task's examples as a datasets.DatasetDict with one "test" split.

    data_dir: from lm-eval's metadata; file: from the task's dataset_kwargs. The rest of the
    task metadata (version, ...) is not needed here.
    """
    if data_dir is None:
        raise ValueError(
            "the memzoo lm-eval tasks read their examples from the metadata key data_dir: run "
            "`memzoo eval lm-eval`, or write them with memzoo.eval.tasks.write_task_data(DIR) "
            'and pass --metadata \'{"data_dir": "DIR"}\' to lm_eval'
        )
    path = Path(data_dir) / file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: write it with memzoo.eval.tasks.write_task_data({data_dir!r})"
        )
    import datasets

    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
