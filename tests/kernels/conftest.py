"""Kernel tests poison fresh torch.empty allocations with NaN, so unwritten outputs fail.

With MEMZOO_TEST_DEVICE=cuda (and TRITON_INTERPRET=0) the same tests run compiled on a GPU:
the seeded factories of `memzoo.kernels.testing` and torch's default device both point there,
and tests marked `cpu` (CPU-only behaviour) or `device_assert` (a bad tensor value, which a GPU
refuses with a device-side assert rather than a ValueError) are left out. Should a test still
trip a device-side assert, which poisons the process's CUDA context, the worker exits so that
pytest-xdist (`-n`) restarts it and later tests run clean.
"""

import os

import pytest
import torch

from memzoo.kernels.testing import TEST_DEVICE, poison_empty

ON_GPU = TEST_DEVICE.type != "cpu"
if ON_GPU:
    torch.set_default_device(TEST_DEVICE)


def pytest_collection_modifyitems(config, items):
    if not ON_GPU:
        return

    def host_only(item) -> bool:
        return any(item.get_closest_marker(name) for name in ("cpu", "device_assert"))

    left_out = [item for item in items if host_only(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not host_only(item)]


def _index_torch_for_dynamo():
    """torch.compile indexes torch's functions once, lazily: let it do so now, before a test
    patches torch.empty_like with its NaN-poisoning stand-in, or a later compiled test finds the
    real function unknown (a graph break that depends on test order)."""
    torch.compile(torch.empty_like, backend="eager", fullgraph=True)(torch.zeros(1, device="cpu"))


_index_torch_for_dynamo()


@pytest.fixture(autouse=True)
def _poison_every_test():
    with poison_empty():
        yield
    if ON_GPU:
        try:
            torch.cuda.synchronize()
        except Exception as error:  # a device-side assert: this process's context is gone
            print(f"\nCUDA context lost ({type(error).__name__}); restarting worker", flush=True)
            os._exit(3)
