"""`memzoo eval ...`: recall evaluations of trained models.

memzoo eval passkey --checkpoint RUN_DIR [--lengths N ...] [--depths D ...]
    zero-shot passkey retrieval of a model trained with `memzoo train` (greedy generation;
    default lengths L, 2L, 4L, 8L for the run's training length L)
memzoo eval passkey --train CONFIG --length L [section.key=value ...]
    train CONFIG's model on passkey at length L with the shared trainer, then evaluate
memzoo eval lm-eval --checkpoint RUN_DIR [--tasks memzoo_passkey,memzoo_mqar,...]
    lm-evaluation-harness tasks (offline memzoo tasks by default; needs memzoo[eval])

Each writes its results (JSON, and the passkey heatmap PNG) into the run directory unless
--out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["add_eval_parsers"]


def _errors() -> tuple[type[Exception], ...]:
    """What a user's input can raise: reported in one line, not as a traceback."""
    from memzoo.train.checkpoint import CheckpointError
    from memzoo.train.trainer import TrainingDiverged

    return ValueError, TypeError, FileNotFoundError, ImportError, CheckpointError, TrainingDiverged


def _run_dir(path: Path) -> Path:
    """The run directory of a run or checkpoint directory (run/checkpoints/step_*)."""
    if path.parent.name == "checkpoints" and (path / "model.safetensors").is_file():
        return path.parent.parent
    return path


def _print_grid(grid) -> None:
    header = "length  " + "".join(f"{f'depth {d:.0%}':>11}" for d in grid.depths) + "       mean"
    print(f"passkey exact match ({grid.num_examples} examples per cell)\n{header}")
    for i, length in enumerate(grid.lengths):
        cells = "".join(f"{a:>11.3f}" for a in grid.exact_match[i])
        print(f"{length:<8}{cells}{grid.exact_match[i].mean():>11.3f}")


def passkey(args: argparse.Namespace) -> int:
    from memzoo.eval.passkey import (
        PasskeyConfig,
        evaluate_lengths,
        train_passkey,
        write_passkey_results,
    )

    try:
        if args.train is not None:
            from memzoo.train.config import load_run_config

            stem = Path(args.train).stem
            defaults = [
                f"train.out_dir=runs/passkey-{stem}-L{args.length}",
                "train.sample_tokens=0",
            ]
            config = load_run_config(args.train, [*defaults, *args.overrides])
            _, grid = train_passkey(
                config,
                PasskeyConfig(seq_len=args.length, filler=args.filler, num_passes=args.num_passes),
                lengths=args.lengths,
                depths=args.depths,
                num_examples=args.examples,
                device=args.device,
            )
            out = Path(config.train.out_dir) if args.out is None else Path(args.out)
            if args.out is not None:
                write_passkey_results(grid, out, f"passkey, trained at {args.length} tokens")
        else:
            from memzoo.train.pretrained import load_trained_lm

            if args.overrides:
                raise ValueError(f"overrides {args.overrides} only apply with --train")
            model, tokenizer, run_config = load_trained_lm(args.checkpoint, device=args.device)
            trained = int(run_config.get("data", {}).get("seq_len", 512))
            grid = evaluate_lengths(
                model,
                args.lengths or [trained * k for k in (1, 2, 4, 8)],
                args.depths,
                num_examples=args.examples,
                seed=args.seed,
                batch_size=args.batch_size,
                filler=args.filler,
                num_passes=args.num_passes,
                mode=args.mode,
                tokenizer=tokenizer,
            )
            grid.extra.update({"checkpoint": str(args.checkpoint), "mode": args.mode})
            out = _run_dir(Path(args.checkpoint)) if args.out is None else Path(args.out)
            write_passkey_results(grid, out, f"passkey, {Path(args.checkpoint).name}")
    except _errors() as error:
        print(f"memzoo eval passkey: error: {error}", file=sys.stderr)
        return 1
    _print_grid(grid)
    print(f"results: {out / 'passkey.json'}, heatmap: {out / 'passkey.png'}")
    return 0


def lm_eval(args: argparse.Namespace) -> int:
    from memzoo.eval.lm_eval import MemzooLM, evaluate_tasks

    run_dir = _run_dir(Path(args.checkpoint))
    try:
        model = MemzooLM.from_checkpoint(
            args.checkpoint,
            device=args.device,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
        results = evaluate_tasks(
            model,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            data_dir=args.data_dir or run_dir / "lm_eval_data",
            seed=args.seed,
            num_examples=args.examples,
            passkey_lengths=args.passkey_lengths,
            num_kv_pairs=args.num_kv_pairs,
            limit=args.limit,
        )
    except _errors() as error:
        print(f"memzoo eval lm-eval: error: {error}", file=sys.stderr)
        return 1
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    out = run_dir / "lm_eval.json" if args.out is None else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    os.replace(tmp, out)
    print(f"results: {out}")
    return 0


def add_eval_parsers(subparsers) -> argparse._SubParsersAction:
    """Register `eval` and its subcommands on the `memzoo` command's subparsers.

    Returns the `eval` subcommands, to which further evaluations add their own parsers.
    """
    parser = subparsers.add_parser(
        "eval", help="recall evaluations (passkey, lm-eval)", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="eval_command", required=True)

    p = commands.add_parser(
        "passkey",
        help="passkey retrieval by length and depth (zero-shot, or train then evaluate)",
        description="Passkey retrieval: a 5-digit key hidden at some depth of filler text. "
        "Overrides (with --train) look like train.steps=500 train.lr=1e-3; after --lengths or "
        "--depths, put -- before them.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a run or checkpoint directory")
    source.add_argument("--train", metavar="CONFIG", help="a run config YAML whose model to train")
    p.add_argument("--length", type=int, default=512, help="training length L (with --train)")
    p.add_argument("--lengths", type=int, nargs="+", help="evaluation lengths (default L 2L 4L 8L)")
    p.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="key depths"
    )
    p.add_argument("--examples", type=int, default=50, help="examples per (length, depth)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--filler", choices=["sentences", "noise"], default="sentences")
    p.add_argument(
        "--num-passes", type=int, default=1, help="copies of the document (2: JRT-Prompt)"
    )
    p.add_argument(
        "--mode",
        choices=["generate", "teacher_forced"],
        default="generate",
        help="zero-shot scoring: the first generated number (default) or teacher-forced digits "
        "(byte tokenizer only); --train always scores teacher-forced",
    )
    p.add_argument("--seed", type=int, default=0, help="evaluation seed (zero-shot)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", metavar="DIR", help="where passkey.json/png go (default: run dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (with --train)")
    p.set_defaults(run=passkey)

    p = commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness tasks on a trained LM (needs memzoo[eval])",
        description="Run lm-eval tasks; the memzoo tasks (memzoo_passkey, memzoo_passkey_jrt, "
        "memzoo_mqar, memzoo_mqar_jrt, or the tag memzoo) are generated locally.",
    )
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a run or checkpoint dir")
    p.add_argument("--tasks", default="memzoo", help="comma-separated task names")
    p.add_argument("--data-dir", help="where task examples go (default: RUN_DIR/lm_eval_data)")
    p.add_argument("--examples", type=int, default=50, help="examples per task (per length)")
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[512])
    p.add_argument("--num-kv-pairs", type=int, default=8)
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="longest model input (default: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", metavar="FILE", help="results JSON (default: RUN_DIR/lm_eval.json)")
    p.set_defaults(run=lm_eval)
    return commands
