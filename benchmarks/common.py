"""Shared pieces of the benchmark scripts: timing and writing result tables atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


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
