"""`memzoo sweep mqar`: the MQAR recall / state-size sweep from the command line.

    memzoo sweep mqar --preset quick                   # CPU: about 11 minutes on one core
    memzoo sweep mqar --preset paper --device cuda     # resumable: rerun to continue
    memzoo sweep mqar --preset quick --mixers attn based --out runs/my-sweep

Writes results.csv, results.md and recall_vs_state.png into --out (default
runs/sweep-mqar-<preset>); see memzoo.eval.sweep for the presets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["PRESET_NAMES", "add_sweep_parser", "run_mqar_sweep"]

PRESET_NAMES = ("quick", "paper")  # memzoo.eval.sweep.PRESETS, named here to keep --help light


def run_mqar_sweep(args: argparse.Namespace) -> int:
    """Run the sweep `args` describe; returns the exit code."""
    import torch

    from memzoo.eval.sweep import PRESETS, TABLE_MD, run_sweep
    from memzoo.train.trainer import TrainingDiverged

    if args.threads is not None:
        if args.threads < 1:
            print(
                f"memzoo sweep mqar: error: --threads must be >= 1, got {args.threads}",
                file=sys.stderr,
            )
            return 2
        torch.set_num_threads(args.threads)
    out = args.out or f"runs/sweep-mqar-{args.preset}"
    try:
        run_sweep(PRESETS[args.preset](), out, mixers=args.mixers, device=args.device)
    except (ValueError, TrainingDiverged) as error:
        print(f"memzoo sweep mqar: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are kept in {out}: rerun to continue", file=sys.stderr)
        return 130
    table = Path(out) / TABLE_MD
    if table.exists():
        print(table.read_text(), end="")
    return 0


def add_sweep_parser(subparsers) -> None:
    """Register `sweep` (with its subcommand `mqar`) on the `memzoo` command's subparsers."""
    sweep = subparsers.add_parser(
        "sweep", help="recall sweeps: accuracy against inference-state size"
    )
    kinds = sweep.add_subparsers(dest="sweep", required=True)
    p = kinds.add_parser(
        "mqar",
        help="MQAR over every registered mixer and width",
        description="MQAR accuracy against inference-state size for every registered mixer, "
        "width and learning rate of a preset. Runs recorded in --out/results.csv are skipped, "
        "so an interrupted sweep continues where it stopped.",
    )
    p.add_argument("--preset", choices=PRESET_NAMES, default="quick", help="default: quick")
    p.add_argument("--out", help="output directory (default: runs/sweep-mqar-<preset>)")
    p.add_argument("--mixers", nargs="+", metavar="NAME", help="only these mixers")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=run_mqar_sweep)
