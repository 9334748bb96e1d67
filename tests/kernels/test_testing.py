"""The test helpers themselves: they must fail when they should."""

import pytest
import torch

from memzoo.kernels.testing import (
    assert_close,
    cu_seqlens_from_lengths,
    poison_empty,
    rand_lengths,
    randn,
    relative_rmse,
)


def test_assert_close_reports_the_error():
    ref = torch.ones(100)
    assert_close("same", ref, ref + 1e-7, 1e-6)
    with pytest.raises(AssertionError, match=r"out: relative RMSE 1\.000e-02 > 1\.0e-03"):
        assert_close("out", ref, ref * 1.01, 1e-3)


def test_assert_close_rejects_nan_and_shape_mismatch():
    out = torch.ones(4)
    out[2] = float("nan")
    with pytest.raises(AssertionError, match="1 of 4 values are NaN/inf"):
        assert_close("o", torch.ones(4), out, 1.0)
    with pytest.raises(AssertionError, match=r"shape \(3,\) != reference \(4,\)"):
        assert_close("o", torch.ones(4), torch.ones(3), 1.0)


def test_relative_rmse_of_zero_reference_is_absolute():
    assert relative_rmse(torch.zeros(4), torch.zeros(4)) == 0.0
    assert relative_rmse(torch.zeros(4), torch.full((4,), 0.5)) == pytest.approx(0.5)


def test_poison_empty_fills_nan_and_restores():
    empty, empty_like = torch.empty, torch.empty_like
    with poison_empty():
        assert torch.empty is not empty
        assert torch.isnan(torch.empty(3)).all()
        assert torch.isnan(torch.empty_like(torch.zeros(2, 2))).all()
        assert (torch.empty(3, dtype=torch.int32) == -1).all()
    assert torch.empty is empty and torch.empty_like is empty_like


def test_factories_are_seeded():
    assert torch.equal(randn(3, 4, seed=1), randn(3, 4, seed=1))
    assert not torch.equal(randn(3, 4, seed=1), randn(3, 4, seed=2))
    assert randn(2, seed=0, dtype=torch.float16, requires_grad=True).requires_grad
    lengths = rand_lengths(5, 9, seed=3)
    assert lengths == rand_lengths(5, 9, seed=3) and all(1 <= n <= 9 for n in lengths)
    cu = cu_seqlens_from_lengths([2, 0, 3])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 2, 5]
