"""Plain-torch Mamba-1 selective scan: the oracle for the kernels and the CPU path.

Per channel d (of group g = d // (Dm / G)) and state n, with delta = softplus(delta + bias):
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[g, n] u_t[d]
    y_t[d] = sum_n C_t[g, n] h_t[d, n] + D[d] u_t[d],      then y_t *= silu(z_t)

Two forms, checked against each other in tests:
- `selective_scan_recurrent_ref`: token by token through `selective_state_update_ref`.
- `selective_scan_chunk_ref`: the CPU path. Chunks of C tokens run one after another; inside
  a chunk, its C / c blocks of c tokens are scanned side by side (see `_scan_chunk`).
  Memory O(C Dm N) per chunk, differentiable by autograd.
All compute in fp32 (fp64 for fp64 inputs); y comes back in u's dtype, states in fp32 (fp64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _effective_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool
) -> torch.Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> torch.Tensor:
    """y + D u, then times silu(z): everything after the scan itself."""
    if D is not None:
        y = torch.addcmul(y, D.to(y.dtype), u)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_state_update_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: u, delta, z `[b, Dm]`, A `[Dm, N]`, B, C `[b, G, N]`, state `[b, Dm, N]`.

    Returns y `[b, Dm]` in u's dtype and the new state `[b, Dm, N]` (a new tensor).
    """
    dtype = _compute_dtype(u, delta, A, B, C)
    b, Dm = u.shape
    G, N = B.shape[1], B.shape[2]
    P = Dm // G
    u_ = u.to(dtype)
    dt = _effective_delta(delta.to(dtype), delta_bias, delta_softplus)
    h = state.to(dtype).view(b, G, P, N)
    decay = torch.exp(dt.view(b, G, P, 1) * A.to(dtype).view(G, P, N))
    h = torch.addcmul((dt * u_).view(b, G, P, 1) * B.to(dtype)[:, :, None, :], decay, h)
    y = (h @ C.to(dtype)[..., None]).view(b, Dm)
    return _skip_and_gate(y, u_, D, z).to(u.dtype), h.view(b, Dm, N)


def selective_scan_recurrent_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token by token through `selective_state_update_ref`: u, delta, z `[B, T, Dm]`,
    B, C `[B, T, G, N]`.

    cu_seqlens (int32 `[N_seq + 1]`, B == 1) packs sequences along T, each with its own state.
    Returns y `[B, T, Dm]` and the final state `[N_seq, Dm, N]` (None unless asked).
    """
    Bsz, T, Dm = u.shape
    N = A.shape[1]
    dtype = _compute_dtype(u, delta, A, B, C)
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    num_seqs = Bsz if cu_seqlens is None else len(offsets) - 1
    if initial_state is None:
        h0 = u.new_zeros(num_seqs, Dm, N, dtype=dtype)
    else:
        h0 = initial_state.to(dtype)
    # Without cu_seqlens the batch runs as one "sequence" of width B.
    seqs = [slice(0, Bsz)] if cu_seqlens is None else [slice(n, n + 1) for n in range(num_seqs)]
    outputs, finals = [], []
    for n, (start, end) in zip(seqs, zip(offsets[:-1], offsets[1:], strict=True), strict=True):
        state = h0[n]
        for t in range(start, end):
            y_t, state = selective_state_update_ref(
                u[:, t],
                delta[:, t],
                A,
                B[:, t],
                C[:, t],
                state,
                D=D,
                z=None if z is None else z[:, t],
                delta_bias=delta_bias,
                delta_softplus=delta_softplus,
            )
            outputs.append(y_t)
        finals.append(state)
    y = torch.stack(outputs, dim=1) if outputs else u.new_zeros(Bsz, 0, Dm)
    return y, torch.cat(finals) if output_final_state else None


# --------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------


def _step_pairs(
    dt: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of every step, a = 2^(dt A) and bx = B x, `[b, S, c, G, N, P]`, one op each
    (their backward too): dt, x `[b, S, c, G, P]`, B `[b, S, c, G, N]`, A `[G, N, P]`.

    With a workspace (no autograd) they are written into its two flat buffers: a fresh
    chunk-sized tensor per chunk is a large allocation that the allocator may hand back to
    the system and fault in again, page by page, for the next chunk.
    """
    if workspace is None:
        # exp2_ in place on the fresh product: mul's backward needs only its inputs.
        return (dt[..., None, :] * A).exp2_(), B[..., None] * x[..., None, :]
    shape = (*dt.shape[:-1], A.shape[1], dt.shape[-1])
    a, bx = (w[: math.prod(shape)].view(shape) for w in workspace)
    torch.mul(dt[..., None, :], A, out=a).exp2_()
    torch.mul(B[..., None], x[..., None, :], out=bx)
    return a, bx


def _scan_chunk(
    dt: torch.Tensor,
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    h: torch.Tensor,
    block_size: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of b sequences: dt, x = dt u `[b, L, G, P]`; B, C `[b, L, G, N]`;
    A `[G, N, P]` in log2 units (A log2(e)); h `[b, G, N, P]` the states entering the chunk;
    workspace None (autograd) or two flat buffers of at least b L G N P floats (block-padded L).

    The chunk is S blocks of c tokens, scanned side by side: every step op works on step j of
    all S blocks at once, so a chunk costs 2c + S step ops instead of L. Pass 1 scans each block
    from a zero state, pass 2 carries the states from block to block with each block's total
    decay, pass 3 scans each block again from its true entering state, keeping every state, and
    one batched matmul reads out y_j = C_j h_j for the whole chunk. States are state-major,
    `[N, P]` per group: channels are the contiguous axis, so every op runs over P-wide rows and
    the readout is a `[1, N] @ [N, P]` product per token. Tensors stay in time order
    `[b, S, c, ...]`: step j of all blocks is S runs of G N P contiguous floats, as fast to
    work on as one, and no input or output needs a transposed copy.
    Returns the scan output sum_n C h `[b, L, G, P]` and the states leaving the chunk.
    """
    b, L, G, P = dt.shape
    c = min(block_size, L)
    S = -(-L // c)
    pad = S * c - L
    if pad:
        # dt = 0 and x = 0 is the identity step (decay 1, no input): padding leaves h as it was.
        dt, x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (dt, x, B, C))
    dt, x = dt.view(b, S, c, G, P), x.view(b, S, c, G, P)
    B, C = B.view(b, S, c, G, -1), C.view(b, S, c, G, -1)
    a, bx = _step_pairs(dt, x, B, A, workspace)
    # unbind, not [:, :, j]: under autograd its backward is one stack, not c zero-filled grads.
    a_steps, bx_steps = a.unbind(2), bx.unbind(2)

    if S > 1:
        # 1. Each block from a zero state up to its last token (without autograd, in one
        # buffer: a fresh tensor per step costs more than the step).
        h_block, out = bx_steps[0], None if workspace is None else torch.empty_like(bx_steps[0])
        for a_j, b_j in zip(a_steps[1:], bx_steps[1:], strict=True):
            h_block = torch.addcmul(b_j, a_j, h_block, out=out)
        # 2. States entering each block, passed block to block with the block's log-space
        # cumulative decay 2^((sum_j dt_j) A) <= 1 for dt >= 0, never a ratio of decays: however
        # large dt |A| gets, nothing overflows and nothing divides by an underflowed product.
        total = torch.exp2(dt.sum(2)[..., None, :] * A)  # [b, S, G, N, P]
        entering = []
        for total_s, h_s in zip(total.unbind(1), h_block.unbind(1), strict=True):
            entering.append(h)
            h = torch.addcmul(h_s, total_s, h)
        h_run = torch.stack(entering, dim=1)
    else:
        h_run = h[:, None]

    # 3. Every block again from its true entering state, keeping every state. Without
    # autograd, state j overwrites bx_j, read for the last time (autograd could not go
    # through in-place updates of a buffer it saved parts of).
    hs = []
    for a_j, b_j in zip(a_steps, bx_steps, strict=True):
        h_run = torch.addcmul(b_j, a_j, h_run, out=None if workspace is None else b_j)
        hs.append(h_run)
    states = torch.stack(hs, dim=2) if workspace is None else bx
    if S == 1:
        h = h_run[:, 0].clone()  # a copy: the next chunk overwrites the workspace
    y = C[..., None, :] @ states  # y_j = C_j h_j for the whole chunk: [b, S, c, G, 1, P]
    return y.view(b, S * c, G, P)[:, :L], h


def _chunk(
    u: torch.Tensor,
    delta: torch.Tensor,
    z: torch.Tensor | None,
    B: torch.Tensor,
    C: torch.Tensor,
    valid: torch.Tensor | None,
    A: torch.Tensor,
    h: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    block_size: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole op on one chunk: u, delta, z `[b, L, Dm]`, B, C `[b, L, G, N]`, `valid`
    `[b, L, 1]` (False on padding) or None; A `[G, N, P]` in log2 units; h `[b, G, N, P]`;
    workspace as in `_scan_chunk`.

    The per-token ops run here, on chunk-sized tensors that stay in cache, rather than on
    whole-sequence ones. Returns y `[b, L, Dm]` in u's dtype and the states leaving the chunk.
    """
    dtype = A.dtype
    b, L, Dm = u.shape
    G = B.shape[2]
    u_ = u.to(dtype)
    dt = _effective_delta(delta.to(dtype), delta_bias, delta_softplus)
    if valid is not None:
        dt = dt * valid
    y, h = _scan_chunk(
        dt.view(b, L, G, Dm // G),
        (dt * u_).view(b, L, G, Dm // G),
        B.to(dtype),
        C.to(dtype),
        A,
        h,
        block_size,
        workspace,
    )
    return _skip_and_gate(y.reshape(b, L, Dm), u_, D, z).to(u.dtype), h


class _DenseChunks:
    """B sequences of T tokens, cut along time into chunks of `chunk` tokens (the last ragged)."""

    def __init__(self, Bsz: int, T: int, chunk_size: int):
        self.chunk = max(1, min(chunk_size, T))
        self.active = [Bsz] * (-(-T // self.chunk))
        self.order = self.unsort = None

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`[B, T, ...]` -> chunk after chunk `[B, L, ...]` (split: its backward is one cat)."""
        return list(x.split(self.chunk, dim=1)) if self.active else []

    def valid(self) -> list[None]:
        """Every row of every chunk is a token: no masks."""
        return [None] * len(self.active)

    def merge(self, ys: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ys, dim=1)


class _PackedChunks:
    """Packed sequences (B == 1, T > 0) visited chunk by chunk: step k runs chunk k of every
    sequence that has one, as a batch.

    Sequences are sorted by length, longest first, so the ones still running at step k are a
    prefix of `active[k]` sequences. Each step gathers `[active[k], chunk]` tokens from the
    packed rows; positions past a sequence's end read an appended zero row and are masked
    to dt = 0, the identity step. Outputs come back through one index_select.
    """

    def __init__(self, lengths: list[int], chunk_size: int, device: torch.device):
        lens = torch.tensor(lengths, dtype=torch.int64)
        total = int(lens.sum())
        self.chunk = L = max(1, min(chunk_size, int(lens.max())))
        starts = torch.cumsum(lens, 0) - lens
        order = torch.argsort(lens, descending=True, stable=True)
        steps = torch.arange(-(-int(lens.max()) // L))
        is_active = lens[order][None, :] > steps[:, None] * L  # [steps, N]
        self.active: list[int] = is_active.sum(1).tolist()

        # Gather rows for every step at once (one gather, one scatter in the backward).
        rank_of_step = torch.cat([torch.arange(a) for a in self.active])
        step_of_row = torch.repeat_interleave(steps, torch.tensor(self.active, dtype=torch.int64))
        seq = order[rank_of_step]  # [rows]
        pos = step_of_row[:, None] * L + torch.arange(L)  # offset inside the sequence
        index = torch.where(pos < lens[seq][:, None], starts[seq][:, None] + pos, total)
        self.gather = index.flatten().to(device)
        self.sizes = [a * L for a in self.active]
        self._valid = (index < total).to(device)[..., None].split(self.active)

        # Where packed token i lands in the concatenated outputs of all steps.
        token_seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
        offset = torch.arange(total) - starts[token_seq]
        rank = torch.argsort(order)
        first_row = torch.cumsum(torch.tensor([0, *self.sizes[:-1]]), 0)
        step = offset // L
        self.scatter = (first_row[step] + rank[token_seq] * L + offset % L).to(device)

        in_order = torch.equal(order, torch.arange(order.numel()))
        self.order = None if in_order else order.to(device)
        self.unsort = None if in_order else rank.to(device)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Packed `[1, T, ...]` -> step after step `[active[k], chunk, ...]`."""
        rows = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])
        gathered = rows.index_select(0, self.gather).split(self.sizes)
        return [g.view(-1, self.chunk, *x.shape[2:]) for g in gathered]

    def valid(self) -> list[torch.Tensor]:
        """Per step, `[active[k], chunk, 1]`: True where the row is a token, not padding."""
        return list(self._valid)

    def merge(self, ys: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([y.flatten(0, 1) for y in ys])
        return flat.index_select(0, self.scatter)[None]


def selective_scan_chunk_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 128,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form, the CPU path: u, delta, z `[B, T, Dm]`, B, C `[B, T, G, N]`.

    Chunks of `chunk_size` tokens run one after another, carrying the states; inside a chunk,
    blocks of `block_size` tokens are scanned at once (see `_scan_chunk`). cu_seqlens (int32
    `[N_seq + 1]`, B == 1) packs sequences along T; it is read on the host.
    Returns y `[B, T, Dm]` and the final state `[N_seq, Dm, N]` (None unless asked).

    Memory: O(T Dm) for inputs and outputs plus O(chunk_size Dm N) for one chunk: without
    autograd, one workspace that every chunk reuses; with it, each chunk is checkpointed: the
    forward keeps only the states entering each chunk, and the backward recomputes one chunk at
    a time.
    """
    for name, value in (("chunk_size", chunk_size), ("block_size", block_size)):
        if value < 1:
            raise ValueError(f"selective_scan_chunk_ref: {name} must be >= 1, got {value}")
    dtype = _compute_dtype(u, delta, A, B, C)
    Bsz, T, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    P = Dm // G
    if cu_seqlens is None:
        layout, num_seqs = _DenseChunks(Bsz, T, chunk_size), Bsz
    else:
        offsets = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        num_seqs = len(lengths)
        layout = _DenseChunks(1, 0, 1) if T == 0 else _PackedChunks(lengths, chunk_size, u.device)

    # State-major [G, N, P], and in log2 units: exp2 is ~2x faster than exp on CPU, and unlike
    # exp it has no slow path for results that underflow (exp is ~10x slower there on x86).
    A2 = (A.to(dtype) * math.log2(math.e)).view(G, P, N).transpose(1, 2).contiguous()
    if initial_state is None:
        h = u.new_zeros(num_seqs, G, N, P, dtype=dtype)
    else:
        h = initial_state.to(dtype).view(num_seqs, G, P, N).transpose(2, 3)
    if layout.order is not None:
        h = h[layout.order]

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    workspace = None
    if not needs_grad and layout.active:
        # Shared by the chunks: the first is the largest (most sequences, the full length).
        c = min(block_size, layout.chunk)
        numel = layout.active[0] * -(-layout.chunk // c) * c * Dm * N
        workspace = (u.new_empty(numel, dtype=dtype), u.new_empty(numel, dtype=dtype))
    no_z = [None] * len(layout.active)
    pieces = zip(
        layout.active,
        layout.split(u),
        layout.split(delta),
        no_z if z is None else layout.split(z),
        layout.split(B),
        layout.split(C),
        layout.valid(),
        strict=True,
    )
    ys = []
    for active, *chunk_inputs in pieces:
        h_k = h if active == h.shape[0] else h[:active]
        args = (*chunk_inputs, A2, h_k, D, delta_bias, delta_softplus, block_size, workspace)
        if needs_grad:
            y_k, h_k = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            y_k, h_k = _chunk(*args)
        h = h_k if active == h.shape[0] else torch.cat([h_k, h[active:]])
        ys.append(y_k)
    y = layout.merge(ys).reshape(Bsz, T, Dm) if ys else u.new_zeros(Bsz, T, Dm)
    if not output_final_state:
        return y, None
    if layout.unsort is not None:
        h = h[layout.unsort]
    return y, h.transpose(2, 3).reshape(num_seqs, Dm, N)
