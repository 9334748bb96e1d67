"""Packed sequences cut into fixed-size chunks, for Triton kernels with one program per chunk.

A batch is handled as packed rows with int32 offsets `cu` `[N + 1]` (a fixed-length batch is
cu = [0, T, 2T, ...]). Chunks of `size` rows never cross a sequence boundary. The table that
maps a program to its (sequence, chunk) is built on the device, without host syncs: its
length is a static upper bound and surplus entries have sequence -1 (`chunk_rows` masks them).
A fixed-length batch's offsets and tables are made once per shape and device and shared.
Imported only by Triton modules.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


class ChunkTable:
    """seq `[bound]` (-1 for surplus), idx `[bound]` (chunk within its sequence), first `[N]`
    (global index of each sequence's first chunk), all int32 on cu's device.

    fixed_length: every sequence has that many rows (cu = [0, T, 2T, ...], `packed_offsets`),
    or None. Fixed-length tables depend on the shape alone, so they are built once per shape
    and device and shared (`_fixed_length_tables`); kernels only read them.
    """

    def __init__(self, cu: torch.Tensor, total: int, fixed_length: int | None, size: int):
        num_seqs = cu.numel() - 1
        if fixed_length is not None and not _capturing(cu.device):
            tables = _fixed_length_tables(num_seqs, fixed_length, size, cu.device)
        else:
            tables = _tables(cu, total, fixed_length, size)
        self.first, self.seq, self.idx, self.bound = tables
        self.cu, self.num_seqs, self.size = cu, num_seqs, size


def _tables(cu: torch.Tensor, total: int, fixed_length: int | None, size: int) -> tuple:
    """(first, seq, idx, bound) of `ChunkTable`, built on cu's device without host syncs."""
    num_seqs = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()
    per_seq = (lengths + size - 1) // size
    ends = torch.cumsum(per_seq, 0)
    first = (ends - per_seq).to(torch.int32)
    # A static bound on the number of chunks: exact for fixed lengths, otherwise each sequence
    # adds at most one partial chunk.
    if fixed_length is not None:
        bound = num_seqs * triton.cdiv(fixed_length, size)
    else:
        bound = triton.cdiv(total, size) + num_seqs
    index = torch.arange(bound, device=cu.device)
    seq = torch.searchsorted(ends, index, right=True)
    valid = seq < num_seqs
    seq = seq.clamp(max=max(num_seqs - 1, 0))
    idx = (index - first.long()[seq]).to(torch.int32)
    return first, torch.where(valid, seq, -1).to(torch.int32), idx, bound


# A table is about 20 small ops, each a kernel launch on a GPU, and a call builds several (the
# selective scan's forward and backward three): at short lengths the launches cost as much as
# the kernels. A run sees few shapes; the caches keep at most this many.
# Made outside inference mode whatever the first caller's mode: an inference tensor cannot be
# saved for a backward, and the kernels' autograd functions save cu and the tables.
@functools.lru_cache(maxsize=256)
def _fixed_length_tables(num_seqs: int, length: int, size: int, device: torch.device) -> tuple:
    """`_tables` of num_seqs sequences of `length` rows in chunks of `size`, made once."""
    cu = _fixed_offsets(num_seqs, length, device)
    with torch.inference_mode(False):
        return _tables(cu, num_seqs * length, length, size)


@functools.lru_cache(maxsize=256)
def _fixed_offsets(num_seqs: int, length: int, device: torch.device) -> torch.Tensor:
    """int32 [0, T, 2T, ..., N T] on `device`, made once (read only)."""
    with torch.inference_mode(False):
        return torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * length


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream: tensors made then
    hold their values only once the graph replays, so nothing made then is cached."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def packed_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple:
    """(cu, fixed_length): the given offsets, or those of B sequences of length T (made once
    per shape and device and shared: read only)."""
    if cu_seqlens is not None:
        return cu_seqlens, None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one cache entry per GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if _capturing(device):
        return torch.arange(B + 1, dtype=torch.int32, device=device) * T, T
    return _fixed_offsets(B, T, device), T


@triton.jit
def chunk_rows(cu_ptr, chunk_seq_ptr, chunk_idx_ptr, i_c, BT: tl.constexpr):
    """(rows [BT] int64, row mask, chunk exists, sequence start, sequence end) of chunk i_c.

    Surplus table entries have no rows, and their slots in per-chunk buffers are never written.
    """
    seq = tl.load(chunk_seq_ptr + i_c)
    valid = seq >= 0
    seq = tl.maximum(seq, 0).to(tl.int64)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    eos = tl.load(cu_ptr + seq + 1).to(tl.int64)
    rows = bos + tl.load(chunk_idx_ptr + i_c).to(tl.int64) * BT + tl.arange(0, BT)
    return rows, (rows < eos) & valid, valid, bos, eos
