"""Kernel tests poison fresh torch.empty allocations with NaN, so unwritten outputs fail."""

import pytest

from memzoo.kernels.testing import nan_poison  # noqa: F401  (the fixture used below)


@pytest.fixture(autouse=True)
def _poison_every_test(nan_poison):  # noqa: F811
    yield
