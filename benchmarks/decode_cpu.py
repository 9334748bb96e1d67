"""Decode cost per token of the tiny LM presets: a prefill, then token-by-token steps.

For each configs/<preset>-tiny.yaml: prefill `--prompt` tokens through the recurrent caches,
then time `--steps` single-token forward calls (`LM.forward(ids[:, None], cache=cache)`), and
report the median milliseconds per token and the inference state (`LM.state_size`) at the
final length. fp32, batch 1, under inference_mode. Writes results/decode-<device>.md.

    python benchmarks/decode_cpu.py --presets mamba memmamba --prompt 256 --steps 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import CONFIGS, PRESETS, device_description, slug, write_result

from memzoo.models.config import load_config
from memzoo.models.lm import LM


@torch.inference_mode()
def decode_ms_per_token(model: LM, prompt: int, steps: int, device: str) -> float:
    """Median wall milliseconds of one single-token step after a `prompt`-token prefill."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + steps + 1), device=device)
    cache = model.init_cache(1, prompt + steps + 1, device=device, dtype=torch.float32)
    model(ids[:, :prompt], cache=cache)
    model(ids[:, prompt : prompt + 1], cache=cache)  # warm-up step
    times = []
    for t in range(prompt + 1, prompt + 1 + steps):
        start = time.perf_counter()
        model(ids[:, t : t + 1], cache=cache)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.manual_seed(0)
    where = device_description(args.device)
    lines = [
        f"# Decode cost per token on {where}",
        "",
        f"torch {torch.__version__}; fp32, batch 1; prefill {args.prompt} tokens, then the median "
        f"of {args.steps} single-token steps. State: floats of inference state per sequence at "
        f"{args.prompt + args.steps + 1} tokens. Command: `python benchmarks/decode_cpu.py "
        f"--presets {' '.join(args.presets)} --prompt {args.prompt} --steps {args.steps} "
        f"--device {args.device}`",
        "",
        "| preset | params | state | ms / token |",
        "|---|---:|---:|---:|",
    ]
    for preset in args.presets:
        model = LM(load_config(CONFIGS / f"{preset}-tiny.yaml")).to(args.device).eval()
        ms = decode_ms_per_token(model, args.prompt, args.steps, args.device)
        state = model.state_size(args.prompt + args.steps + 1)
        row = f"| {preset}-tiny | {model.num_params():,} | {state:,} | {ms:.2f} |"
        print(row, flush=True)
        lines.append(row)
    name = f"decode-{slug(args.device if args.device == 'cpu' else where)}.md"
    print(f"wrote {write_result(name, lines)}")


if __name__ == "__main__":
    main()
