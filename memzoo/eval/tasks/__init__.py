"""Offline lm-evaluation-harness tasks over examples that memzoo generates (no download).

    memzoo_passkey       passkey retrieval, greedy generation; exact match of the first number
    memzoo_passkey_jrt   the same documents written twice before the question (JRT-Prompt)
    memzoo_mqar          associative recall in text: "kfq 417, pzb 902, ... pzb" -> " 902",
                         scored as a multiple choice over the context's values (acc)
    memzoo_mqar_jrt      the same pairs and queries with the pairs written twice
    memzoo               (a tag) all four

The YAML files here read JSONL examples from the directory given as lm-eval metadata
`data_dir`, written by `write_task_data` (memzoo.eval.tasks.data). `memzoo eval lm-eval` (or
memzoo.eval.lm_eval.evaluate_tasks) does both; by hand, with lm-eval's Python API::

    write_task_data("lm_data")
    tasks = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": "lm_data"})
    lm_eval.simple_evaluate(model=..., tasks=["memzoo"], task_manager=tasks)
"""

from pathlib import Path

from memzoo.eval.tasks.data import TASK_FILES, write_task_data

__all__ = ["TASKS_DIR", "TASK_FILES", "write_task_data"]

TASKS_DIR = Path(__file__).parent
