"""The `memzoo` command (also `python -m memzoo`).

memzoo info     versions, devices, usable backends and the registered ops
memzoo train    pretrain an LM: --config configs/<preset>.yaml [section.key=value ...]
                [--resume RUN_DIR]; the same under torchrun --nproc_per_node N
memzoo sweep    mqar --preset quick|paper: every mixer on the recall vs state-size plane
memzoo eval     passkey (by length and depth), lm-eval (offline tasks), fidelity (memory
                fidelity of checkpoints)
"""

from __future__ import annotations

import argparse
import platform
import sys


def _devices() -> list[str]:
    import torch

    devices = [
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB)"
            )
    return devices


def _backends() -> list[tuple[str, bool, str]]:
    """(backend, usable, detail) for each way memzoo can run a kernel here."""
    import torch

    from memzoo.kernels import _core

    triton_ok, triton_detail = _core.triton_status()
    cuda = torch.cuda.is_available()
    interpret = _core.interpreter_enabled()
    extension_ok, extension_detail = _core.cuda_extension_status()
    return [
        ("torch", True, "plain-torch references; the CPU path"),
        (
            "triton (GPU)",
            triton_ok and cuda,
            triton_detail
            if not triton_ok
            else ("CUDA device present" if cuda else "no CUDA device"),
        ),
        (
            "triton (interpreter)",
            triton_ok and interpret,
            triton_detail
            if not triton_ok
            else ("TRITON_INTERPRET=1" if interpret else "set TRITON_INTERPRET=1 to enable"),
        ),
        ("cuda extension", extension_ok, extension_detail),
    ]


def info(_: argparse.Namespace) -> int:
    import torch

    import memzoo
    from memzoo.kernels import _core

    triton_ok, triton_detail = _core.triton_status()
    print(f"memzoo  {memzoo.__version__}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    print(f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton  {triton_detail if triton_ok else 'not available: ' + triton_detail}")
    print("\ndevices")
    for device in _devices():
        print(f"  {device}")
    print("\nbackends")
    for name, usable, detail in _backends():
        print(f"  {name:<22}{'yes' if usable else 'no':<5}{detail}")
    print("\nops")
    for op in _core.registered_ops():
        print(f"  {op.name:<28}{', '.join(op.backends)}")
    return 0


def train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from memzoo.train.checkpoint import CheckpointError
    from memzoo.train.config import load_run_config
    from memzoo.train.trainer import Trainer, TrainingDiverged

    config_path = args.config
    if config_path is None and args.resume is not None:
        config_path = Path(args.resume) / "config.yaml"  # the run's own config
    try:
        config = load_run_config(config_path, args.overrides)
        trainer = Trainer(config, resume=args.resume, device=args.device)
        result = trainer.run()
    except (CheckpointError, TrainingDiverged, ValueError, FileNotFoundError) as error:
        print(f"memzoo train: error: {error}", file=sys.stderr)
        return 1
    finally:
        if "trainer" in locals():
            trainer.dist.close()
    if trainer.dist.is_main:
        state = "interrupted; checkpoint saved" if result.interrupted else "done"
        eval_text = "" if result.eval_loss is None else f", held-out loss {result.eval_loss:.4f}"
        print(
            f"{state}: step {result.step}, loss {result.loss:.4f}{eval_text}, "
            f"{result.tokens_per_s:,.0f} tokens/s; run directory {result.run_dir}"
        )
    return 130 if result.interrupted else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, devices, backends and ops").set_defaults(run=info)
    p = commands.add_parser(
        "train",
        help="pretrain an LM (single process, or under torchrun)",
        description="Pretrain an LM. Overrides look like train.lr=1e-3 model.d_model=64.",
    )
    p.add_argument("--config", help="run config YAML (model/data/train sections)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(run=train)

    from memzoo.eval.cli_eval import add_eval_parsers
    from memzoo.eval.cli_sweep import add_sweep_parser
    from memzoo.eval.fidelity import add_fidelity_parser

    add_fidelity_parser(add_eval_parsers(commands))
    add_sweep_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
