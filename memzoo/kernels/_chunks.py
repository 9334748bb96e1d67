"""Packed sequences cut into fixed-size chunks, for Triton kernels with one program per chunk.

A batch is handled as packed rows with int32 offsets `cu` `[N + 1]` (a fixed-length batch is
cu = [0, T, 2T, ...]). Chunks of `size` rows never cross a sequence boundary. The table that
maps a program to its (sequence, chunk) is built on the device, without host syncs: its
length is a static upper bound and surplus entries have sequence -1 (`chunk_rows` masks them).
Imported only by Triton modules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class ChunkTable:
    """seq `[bound]` (-1 for surplus), idx `[bound]` (chunk within its sequence), first `[N]`
    (global index of each sequence's first chunk), all int32 on cu's device."""

    def __init__(self, cu: torch.Tensor, total: int, fixed_length: int | None, size: int):
        num_seqs = cu.numel() - 1
        lengths = (cu[1:] - cu[:-1]).long()
        per_seq = (lengths + size - 1) // size
        ends = torch.cumsum(per_seq, 0)
        self.first = (ends - per_seq).to(torch.int32)
        # A static bound on the number of chunks: exact for fixed lengths, otherwise each
        # sequence adds at most one partial chunk.
        if fixed_length is not None:
            self.bound = num_seqs * triton.cdiv(fixed_length, size)
        else:
            self.bound = triton.cdiv(total, size) + num_seqs
        index = torch.arange(self.bound, device=cu.device)
        seq = torch.searchsorted(ends, index, right=True)
        valid = seq < num_seqs
        seq = seq.clamp(max=max(num_seqs - 1, 0))
        self.seq = torch.where(valid, seq, -1).to(torch.int32)
        self.idx = (index - self.first.long()[seq]).to(torch.int32)
        self.cu, self.num_seqs, self.size = cu, num_seqs, size


def packed_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple:
    """(cu, fixed_length): the given offsets, or those of B sequences of length T."""
    if cu_seqlens is not None:
        return cu_seqlens, None
    return torch.arange(B + 1, dtype=torch.int32, device=device) * T, T


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
