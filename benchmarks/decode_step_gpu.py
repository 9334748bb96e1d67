"""GPU time of one decode step of the state-space mixers' scans.

Mamba-1's `selective_state_update` (Dm=1536, N=16, one B/C group, softplus + bias, D, z) and
Mamba-2's `ssd_step` (H=24, P=64, N=128), each on memzoo's torch and Triton backends, and
mamba-ssm's Triton `selective_state_update` when mamba-ssm is importable (its Triton modules
also from an unbuilt source tree on PYTHONPATH). bf16 activations, fp32 states and parameters.
A step is launch-bound, so each time is a loop of `--steps` calls between two CUDA events,
divided by the count: the median of `--repeats` loops, in microseconds a step. Writes
benchmarks/results/decode_step-<gpu>.md.

    python benchmarks/decode_step_gpu.py [--batches 1 16 64] [--steps 100] [--repeats 10]
"""

from __future__ import annotations

import argparse

import torch
from common import from_mamba_ssm, slug, write_result

from memzoo.kernels import selective_state_update, ssd_step


def _mamba1_inputs(batch, Dm=1536, N=16):
    cuda = {"device": "cuda"}
    return {
        "u": torch.randn(batch, Dm, dtype=torch.bfloat16, **cuda),
        "delta": torch.randn(batch, Dm, dtype=torch.bfloat16, **cuda),
        "A": -torch.rand(Dm, N, **cuda) - 0.1,
        "B": torch.randn(batch, 1, N, dtype=torch.bfloat16, **cuda),
        "C": torch.randn(batch, 1, N, dtype=torch.bfloat16, **cuda),
        "state": torch.randn(batch, Dm, N, **cuda),
        "D": torch.randn(Dm, **cuda),
        "z": torch.randn(batch, Dm, dtype=torch.bfloat16, **cuda),
        "delta_bias": torch.randn(Dm, **cuda) * 0.5,
    }


def _mamba2_inputs(batch, H=24, P=64, N=128):
    cuda = {"device": "cuda"}
    return {
        "x": torch.randn(batch, H, P, dtype=torch.bfloat16, **cuda),
        "dt": torch.randn(batch, H, **cuda),
        "A": -torch.rand(H, **cuda) - 0.1,
        "B": torch.randn(batch, 1, N, dtype=torch.bfloat16, **cuda),
        "C": torch.randn(batch, 1, N, dtype=torch.bfloat16, **cuda),
        "state": torch.randn(batch, H, P, N, **cuda),
    }


def _implementations() -> dict:
    """name -> (make inputs, step(inputs))."""

    def memzoo_mamba1(backend):
        def step(t):
            return selective_state_update(
                t["u"], t["delta"], t["A"], t["B"], t["C"], t["state"], D=t["D"], z=t["z"],
                delta_bias=t["delta_bias"], delta_softplus=True, backend=backend,
            )  # fmt: skip

        return step

    def memzoo_mamba2(backend):
        def step(t):
            return ssd_step(t["x"], t["dt"], t["A"], t["B"], t["C"], t["state"], backend=backend)

        return step

    impls = {
        "memzoo selective_state_update, torch": (_mamba1_inputs, memzoo_mamba1("torch")),
        "memzoo selective_state_update, triton": (_mamba1_inputs, memzoo_mamba1("triton")),
        "memzoo ssd_step, torch": (_mamba2_inputs, memzoo_mamba2("torch")),
        "memzoo ssd_step, triton": (_mamba2_inputs, memzoo_mamba2("triton")),
    }
    theirs = from_mamba_ssm("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    if theirs is not None:

        def mamba_ssm_step(t):  # updates t["state"] in place
            return theirs(
                t["state"], t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                dt_bias=t["delta_bias"], dt_softplus=True,
            )  # fmt: skip

        impls["mamba-ssm selective_state_update (Triton)"] = (_mamba1_inputs, mamba_ssm_step)
    return impls


def microseconds_per_step(step, inputs, steps: int, repeats: int) -> float:
    """Median over `repeats` loops of `steps` calls, in microseconds a call."""
    step(inputs)
    step(inputs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step(inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(1000 * start.elapsed_time(end) / steps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_step_gpu.py needs a CUDA device")
        return
    device = torch.cuda.get_device_name(0)
    lines = [
        f"# decode step of the state-space scans on {device}",
        "",
        "Mamba-1 step: Dm=1536, N=16, softplus + bias, D, z; Mamba-2 step: H=24, P=64, N=128; "
        f"bf16 activations, fp32 states; median of {args.repeats} loops of {args.steps} steps, "
        f"microseconds a step; torch {torch.__version__}. Reproduce: `python "
        f"benchmarks/decode_step_gpu.py --batches {' '.join(map(str, args.batches))} "
        f"--steps {args.steps} --repeats {args.repeats}`.",
        "",
        "| batch | implementation | us / step |",
        "|---:|---|---:|",
    ]
    with torch.inference_mode():
        for batch in args.batches:
            for name, (make, step) in _implementations().items():
                us = microseconds_per_step(step, make(batch), args.steps, args.repeats)
                print(f"batch={batch:>3} {name:<44} {us:8.1f} us", flush=True)
                lines.append(f"| {batch} | {name} | {us:.1f} |")
    print(f"wrote {write_result(f'decode_step-{slug(device)}.md', lines)}")


if __name__ == "__main__":
    main()
