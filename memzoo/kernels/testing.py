"""Helpers for testing kernels against their references.

- `assert_close(name, ref, out, ratio)`: relative RMSE check with the error in the message.
- `randn`, `rand_lengths`, `cu_seqlens_from_lengths`: seeded input factories. Their tensors
  land on `TEST_DEVICE`: "cpu", or what `MEMZOO_TEST_DEVICE` names, so the Triton tests also
  run compiled on a GPU (`MEMZOO_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/kernels`).
- `bad_cu_seqlens_values(total)`: parametrize cases of cu_seqlens with wrong values, marked
  `device_assert` (a GPU refuses them with a device-side assert, not ValueError).
- `poison_empty()` / the `nan_poison` fixture: fresh `torch.empty` / `torch.empty_like`
  allocations are filled with NaN (integers with -1), so an output a kernel forgets to
  write fails the comparison instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import pytest
import torch

TEST_DEVICE = torch.device(os.environ.get("MEMZOO_TEST_DEVICE", "cpu"))


def relative_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||ref - out|| / ||ref|| in float64; the plain RMS of `out` when `ref` is all zeros."""
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    ref_norm = ref64.norm().item()
    diff_norm = (ref64 - out64).norm().item()
    if ref_norm == 0.0:
        return diff_norm / max(ref64.numel(), 1) ** 0.5
    return diff_norm / ref_norm


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Assert that `out` matches `ref` to a relative RMSE of at most `ratio`.

    Shapes must match exactly and `out` must be finite wherever `ref` is.
    """
    if tuple(ref.shape) != tuple(out.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    bad = (~torch.isfinite(out.detach())) & torch.isfinite(ref.detach())
    if bool(bad.any()):
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {out.numel()} values are NaN/inf where the reference "
            "is finite (an unwritten output?)"
        )
    error = relative_rmse(ref, out)
    if not error <= ratio:
        max_abs = (ref.detach().double().cpu() - out.detach().double().cpu()).abs().max().item()
        raise AssertionError(
            f"{name}: relative RMSE {error:.3e} > {ratio:.1e} (max abs diff {max_abs:.3e})"
        )


def randn(
    *shape: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    scale: float = 1.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Normal samples from a private generator: the same seed gives the same tensor anywhere.

    Drawn on the CPU in fp64, then moved to `device` (default `TEST_DEVICE`) and cast."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu")
    t = (t * scale).to(dtype)
    return t.to(TEST_DEVICE if device is None else device).requires_grad_(requires_grad)


def rand_lengths(num_seqs: int, max_len: int, *, seed: int, min_len: int = 1) -> list[int]:
    """`num_seqs` sequence lengths drawn uniformly from [min_len, max_len]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num_seqs,), generator=generator, device="cpu")
    return lengths.tolist()


def cu_seqlens_from_lengths(
    lengths: Sequence[int], device: str | torch.device | None = None
) -> torch.Tensor:
    """int32 offsets `[N + 1]` of sequences with the given lengths packed back to back
    (on `device`, default `TEST_DEVICE`)."""
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cpu")
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64, device="cpu"), 0)
    return offsets.to(TEST_DEVICE if device is None else device)


def bad_cu_seqlens_values(total: int, length_name: str = "T") -> list:
    """`pytest.param({"cu_seqlens": ...}, ValueError, match)` cases for a packed length
    `total` >= 6: offsets that start past 0, go down, or end short of `total`.

    The shared check (`InputCheck.cu_seqlens`) reads these values on CPU; on a GPU it asserts on
    the device instead, so the cases are marked `device_assert` and left out there.
    """
    cases = [
        ([1, total], "cu_seqlens must start at 0"),
        ([0, total - 3, total - 5, total], "cu_seqlens must be non-decreasing"),
        ([0, total - 1], f"cu_seqlens must end at the packed length {length_name}={total}"),
    ]
    return [
        pytest.param(
            {"cu_seqlens": torch.tensor(offsets, dtype=torch.int32)},
            ValueError,
            match,
            marks=pytest.mark.device_assert,
        )
        for offsets, match in cases
    ]


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:  # a leaf made by torch.empty(..., requires_grad=True) (checkpoint's
        return t  # dummy): never a kernel's output, and in-place fills are refused on it
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1)
    return t


@contextlib.contextmanager
def poison_empty() -> Iterator[None]:
    """Within the block, torch.empty / torch.empty_like return NaN-filled tensors."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned_empty(*args, **kwargs):
        return _poison(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):
        return _poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned_empty, poisoned_empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@pytest.fixture
def nan_poison() -> Iterator[None]:
    """Pytest fixture form of `poison_empty()`; kernel tests use it automatically."""
    with poison_empty():
        yield
