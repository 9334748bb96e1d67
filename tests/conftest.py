"""Test-suite setup: run Triton kernels on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first.
Tests marked `gpu` need a CUDA device and are skipped where there is none.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
