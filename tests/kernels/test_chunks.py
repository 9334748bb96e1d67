"""The chunk tables the Triton kernels walk: built on the device, and for fixed lengths once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memzoo.kernels._chunks import ChunkTable, _tables, packed_offsets
from memzoo.kernels.testing import TEST_DEVICE, cu_seqlens_from_lengths


class _CountOps(TorchDispatchMode):
    """Counts the torch ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "B, T, size", [(1, 1, 8), (2, 100, 8), (3, 64, 16), (4, 37, 64), (2, 0, 8)]
)
def test_fixed_length_tables_equal_the_variable_length_ones(B, T, size):
    """Cached fixed-length tables hold what the variable-length construction gives for the
    same offsets (whose bound adds a surplus entry a sequence)."""
    cu, fixed_length = packed_offsets(B, T, None, TEST_DEVICE)
    assert fixed_length == T and cu.dtype == torch.int32
    assert cu.tolist() == [i * T for i in range(B + 1)]
    fixed = ChunkTable(cu, B * T, T, size)
    varlen = ChunkTable(cu_seqlens_from_lengths([T] * B).to(TEST_DEVICE), B * T, None, size)
    assert fixed.bound == B * -(-T // size)
    assert torch.equal(fixed.first, varlen.first)
    assert torch.equal(fixed.seq, varlen.seq[: fixed.bound])
    assert torch.equal(fixed.idx, varlen.idx[: fixed.bound])
    assert (varlen.seq[fixed.bound :] == -1).all()
    first, seq, idx, bound = _tables(cu, B * T, T, size)
    assert bound == fixed.bound
    for name, made, cached in (("first", first, fixed.first), ("seq", seq, fixed.seq),
                               ("idx", idx, fixed.idx)):  # fmt: skip
        assert torch.equal(made, cached), name


def test_a_fixed_length_table_is_made_once():
    """The second table of a shape (and its offsets) dispatches no torch op: the same tensors."""
    cu, _ = packed_offsets(3, 48, None, TEST_DEVICE)
    first = ChunkTable(cu, 3 * 48, 48, 8)
    with _CountOps() as ops:
        cu_again, _ = packed_offsets(3, 48, None, TEST_DEVICE)
        again = ChunkTable(cu_again, 3 * 48, 48, 8)
    assert ops.count == 0
    assert cu_again is cu and again.seq is first.seq and again.idx is first.idx
    with _CountOps() as ops:  # variable lengths are built on the device every call
        ChunkTable(cu_seqlens_from_lengths([40, 8]).to(TEST_DEVICE), 48, None, 8)
    assert ops.count > 0


def test_tables_first_made_in_inference_mode_serve_autograd():
    """A shape first seen under torch.inference_mode (an evaluation before training) leaves
    normal tensors in the cache: the kernels' autograd functions save cu and the tables."""
    with torch.inference_mode():
        cu, _ = packed_offsets(5, 24, None, TEST_DEVICE)
        table = ChunkTable(cu, 5 * 24, 24, 8)
    assert not cu.is_inference()
    assert not any(t.is_inference() for t in (table.first, table.seq, table.idx))
