"""Shared pieces of the benchmark scripts: timing, memory in fresh processes, atomic tables."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The LM presets: configs/<preset>-tiny.yaml and configs/<preset>-125m.yaml.
PRESETS = ("transformer", "based", "mamba", "mamba2", "jrt", "hydra", "memmamba", "mom")


def device_description(device: str) -> str:
    """What a result table says it ran on: the GPU's name, or the CPU and its torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def package_without_init(name: str) -> bool:
    """Make `import name.sub` work without running `name/__init__.py`: a bare package object over
    the package's folder goes into sys.modules. For mamba-ssm's unbuilt sources, whose __init__
    imports the CUDA extension (`selective_scan_cuda`) that only a built install has, while its
    Triton and plain-torch modules need none. False if the package is not on the path."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return False
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    return True


def from_mamba_ssm(module: str, name: str):
    """`name` from mamba-ssm's `module`, or None (saying why) where it cannot be imported.

    mamba-ssm's package __init__ imports all of its modules, the selective scan's CUDA extension
    (`selective_scan_cuda`, which only a built install has) among them. From a source tree on
    PYTHONPATH, with or without a separately built `selective_scan_cuda` beside it, the wanted
    module is loaded under a bare package object that skips that __init__.
    """
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # an optional baseline: any failure of its package __init__ is skipped
        if not package_without_init("mamba_ssm"):
            return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as error:
        sys.modules.pop("mamba_ssm", None)
        print(f"mamba-ssm's {module}.{name} is unavailable: {type(error).__name__}: {error}")
        return None


def cuda_time_or_refusal(fn, repeats: int) -> float | str:
    """cuda_time_ms(fn), or the first line of the RuntimeError a baseline raises to refuse the
    work (fla refuses some backward kernels on some Triton versions): a table cell either way."""
    try:
        return cuda_time_ms(fn, repeats)
    except RuntimeError as error:
        return f"refused: {str(error).splitlines()[0][:120]}"


def ms_cell(value: float | str) -> str:
    """A table cell of milliseconds, or the refusal text that stands in for them."""
    return f"{value:.3f}" if isinstance(value, float) else value


def cuda_time_ms(fn, repeats: int) -> float:
    """Median CUDA-event time of fn() in milliseconds, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def slug(text: str) -> str:
    """A file-name piece: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return "-".join(text.lower().replace("(", " ").replace(")", " ").split())


def write_result(name: str, lines: list[str]) -> Path:
    """Write a markdown table to benchmarks/results/<name> atomically (no half-written file)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp") as tmp:
        tmp.write("\n".join(lines) + "\n")
    os.replace(tmp.name, path)
    return path


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_in_subprocesses(command: Callable[[int], list[str]], repeats: int) -> dict:
    """Run a worker command (taking a repeat count) in fresh processes; return its JSON row.

    The first run times `repeats` calls under the default allocator; a second single call
    runs with glibc's mmap threshold pinned at 64 KiB, so freed memory returns to the system
    and `peak_mmap_mib` shows what the algorithm holds rather than heap fragmentation.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(command(repeats), capture_output=True, text=True, check=True, env=env)
    row = json.loads(result.stdout)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    result = subprocess.run(command(1), capture_output=True, text=True, check=True, env=env)
    row["peak_mmap_mib"] = json.loads(result.stdout)["peak_mib"]
    return row
