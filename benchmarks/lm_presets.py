"""Parameter counts, inference state sizes and training throughput of the LM presets.

For every configs/<preset>-tiny.yaml and -125m.yaml: parameters (with and without the embedding
table) and state_size at a few sequence lengths; for the tiny presets also forward+backward
tokens/s on this machine's CPU (fp32; or on CUDA with --device cuda, bf16 autocast).

    python benchmarks/lm_presets.py                     # writes results/lm_presets-<device>.md
    python benchmarks/lm_presets.py --batch 8 --seq-len 256 --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CONFIGS, PRESETS, device_description, slug, write_result

from memzoo.models.config import load_config
from memzoo.models.lm import LM

STATE_LENGTHS = (1024, 8192)


def train_tokens_per_s(model: LM, batch: int, seq_len: int, steps: int, device: str) -> float:
    """Median forward+backward throughput over `steps` timed steps after one warm-up."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    x, labels = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model.loss(x, labels)
            if model.aux_loss is not None:
                loss = loss + 0.01 * model.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch * seq_len / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument(
        "--train-sizes", nargs="+", default=["tiny"], choices=["tiny", "125m"],
        help="sizes whose training throughput is timed (125m wants a GPU)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    where = device_description(args.device)
    lines = [
        f"# LM presets on {where}",
        "",
        f"torch {torch.__version__}. Tokens/s: forward + backward of `LM.loss` at batch "
        f"{args.batch} x {args.seq_len} tokens, median of {args.steps} steps, "
        f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}; sizes timed: "
        f"{', '.join(args.train_sizes)}. "
        "State: floats of inference state per sequence (`LM.state_size`). Command: "
        f"`python benchmarks/lm_presets.py --device {args.device} --batch {args.batch} "
        f"--seq-len {args.seq_len} --steps {args.steps} --presets {' '.join(args.presets)} "
        f"--train-sizes {' '.join(args.train_sizes)}`",
        "",
        "| preset | params | params w/o embeddings | "
        + " | ".join(f"state @ {n}" for n in STATE_LENGTHS)
        + " | train tokens/s |",
        "|---|---:|---:|" + "---:|" * len(STATE_LENGTHS) + "---:|",
    ]
    for preset in args.presets:
        for size in ("tiny", "125m"):
            model = LM(load_config(CONFIGS / f"{preset}-{size}.yaml"))
            speed = ""
            if size in args.train_sizes:
                model = model.to(args.device)
                rate = train_tokens_per_s(model, args.batch, args.seq_len, args.steps, args.device)
                speed = f"{rate:,.0f}"
            states = " | ".join(f"{model.state_size(n):,}" for n in STATE_LENGTHS)
            row = (
                f"| {preset}-{size} | {model.num_params():,} | "
                f"{model.num_params(embeddings=False):,} | {states} | {speed} |"
            )
            print(row, flush=True)
            lines.append(row)
    path = write_result(
        f"lm_presets-{slug(args.device if args.device == 'cpu' else where)}.md", lines
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
