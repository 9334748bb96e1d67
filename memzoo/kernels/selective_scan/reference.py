"""Plain-torch Mamba-1 selective scan: the oracle for the kernels and the CPU path.

Per channel d (of group g = d // (Dm / G)) and state n, with delta = softplus(delta + bias):
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[g, n] u_t[d]
    y_t[d] = sum_n C_t[g, n] h_t[d, n] + D[d] u_t[d],      then y_t *= silu(z_t)

Two forms, checked against each other in tests:
- `selective_scan_recurrent_ref`: token by token through `selective_state_update_ref`.
- `selective_scan_chunk_ref`: the CPU path. Chunks of C tokens run one after another; inside
  a chunk, token by token (one foreach call) over decays and inputs computed for the whole
  chunk at once, or, on request, C / c blocks of c tokens side by side (see `_blocked_chunk`).
  Memory O(C Dm N) per chunk; differentiable, the token loop through a backward of its own.
All compute in fp32 (fp64 for fp64 inputs); y comes back in u's dtype, states in fp32 (fp64).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
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

# Bytes each of a chunk's buffers aims at (decays, states; with autograd, the states' gradients
# too): the forward alone works through two of them, with autograd the backward through four
# (see `_default_chunk_size`).
_CHUNK_BUFFER_BYTES = {"forward": 3 << 20, "autograd": 2 << 20}


def _default_chunk_size(width: int, itemsize: int, autograd: bool) -> int:
    """Tokens per chunk when chunk_size is None: the largest L in [8, 256] of the form 2^k or
    3 * 2^(k-1) whose buffers of L x `width` values (a token's states: sequences x Dm x N) of
    `itemsize` bytes stay within 3 MiB each (with autograd 2 MiB), or 8.

    Each chunk makes a handful of whole-chunk ops, each with its fixed cost, so narrow states
    want long chunks; wide ones want chunks whose buffers stay in cache, and the backward's
    four buffers want shorter ones than the forward's two. Measured on a 2-core x86 VM (1 MiB
    L2 a core, 32 MiB L3) against the neighbouring candidates, interleaved in one process,
    with the thread's workspace kept between calls:
    - forward: Dm=64, N=16 (1024 states a token) runs 1.2x faster in chunks of 256 than of 64;
      one sequence of Dm=512 (8192 states) 1.03-1.06x faster in 96 than in 64 at T=1024 and
      4096, as fast at T=256 (128: as fast as 96 at T=1024 and 4096, 0.94-1.01x at T=256);
      Dm=256 (4096) 1.02x in 192 than in 128 (256: 0.97-1.01x); three sequences of Dm=512
      1.08-1.12x in 32 than in 16; 16 sequences of Dm=256 (65536) 1.1x in 12 than in 8.
    - with autograd: one sequence of Dm=512 keeps 64 (96: 0.89-1.03x; 32: 1.08x slower),
      Dm=256 keeps 128 (192: 0.97-0.98x); 16 sequences of Dm=256 keep 8 (12 ran 1.03-1.07x
      faster there: one budget for every width is a compromise).
    """
    budget = _CHUNK_BUFFER_BYTES["autograd" if autograd else "forward"]
    tokens = max(budget // max(width * itemsize, 1), 1)
    power = 1 << (tokens.bit_length() - 1)
    L = power * 3 // 2 if power * 3 // 2 <= tokens else power
    return max(8, min(256, L))


def _blocks_per_chunk(L: int, block_size: int | None) -> int:
    """How many blocks S a chunk of L tokens is scanned in: one, a token loop, unless
    block_size asks for blocks of that many tokens side by side (see `_blocked_chunk`).

    The token loop is one foreach call per chunk, about 1 us a token at 8192 states; blocks make
    2c + S Python-level step ops (c = L / S) and read the chunk's step pairs twice. Without
    autograd blocks of the best size ran 1.2-1.6x slower than the token loop at every width
    measured (64 to 8192 states a token, one sequence, chunks of 64, 2-core x86 VM); with
    autograd they go op by op, where the token loop has a backward of its own
    (`_ChunkedTokenLoop`).
    """
    return 1 if block_size is None else -(-L // min(block_size, L))


def _foreach_recurrence_(x: tuple, a: tuple, first: torch.Tensor) -> None:
    """x_j += a_j * x_{j-1} for j = 0, 1, ... in order, x_{-1} = `first`: the token loop, in
    place. x, a: sequences of equal-shaped tensors (first alike), x_j and x_{j-1} disjoint.

    On CPU, one foreach call: it runs its in-place addcmul element after element, in list
    order, so step j reads the x_{j-1} that step j-1 has just written, and a token costs one
    kernel dispatch, ~0.7 us less than a Python-level op call (at B=1, T=4096, Dm=512, N=16 the
    forward runs 1.07x faster, forward + backward 1.10x). On CUDA a foreach call updates its
    list side by side, every step reading x_{j-1} before it is written, so there the steps are
    one addcmul each. The chunked tests against the token-by-token reference, and
    `test_foreach_recurrence_runs_in_order`, hold both to that.
    """
    if first.device.type != "cpu":
        _stepwise_recurrence_(x, a, first)
        return
    torch._foreach_addcmul_(x, a, (first, *x[:-1]))


def _stepwise_recurrence_(x: tuple, a: tuple, first: torch.Tensor) -> None:
    """`_foreach_recurrence_` one addcmul a step: in order on every device."""
    previous = first
    for x_j, a_j in zip(x, a, strict=True):
        x_j.addcmul_(a_j, previous)
        previous = x_j


class _Workspace:
    """Flat chunk-sized buffers that every chunk reuses, and their views: two for a chunk's
    step pairs, two more for the token loop's backward.

    A fresh chunk-sized tensor per chunk is a large allocation that the allocator may hand back
    to the system and fault in again, page by page, for the next chunk; and the per-step views
    of a chunk's pairs cost a Python call each, so they are made once per chunk shape.
    """

    def __init__(self, numel: int, like: torch.Tensor, dtype: torch.dtype, count: int = 2):
        self.buffers = tuple(like.new_empty(numel, dtype=dtype) for _ in range(count))
        self._views: dict[tuple[int, ...], tuple] = {}
        self.busy = False  # lent out by `_borrowed_workspace`

    def holds(self, numel: int, device: torch.device, dtype: torch.dtype, count: int) -> bool:
        """Whether this workspace has `count` buffers of `numel` floats of `dtype` on `device`."""
        first = self.buffers[0]
        return (
            (first.device, first.dtype) == (device, dtype)
            and len(self.buffers) >= count
            and first.numel() >= numel
        )

    def buffer(self, i: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Buffer i as a tensor of `shape`."""
        return self.buffers[i][: math.prod(shape)].view(shape)

    def steps(self, i: int, shape: tuple[int, ...]) -> tuple:
        """(x, x_steps): buffer i as `shape`, `[b, S, c, G, N, P]` or `[b, c, G, N, P]`, and
        its c steps (along the fourth axis from the last)."""
        key = (i, shape)
        if key not in self._views:
            if len(self._views) >= 64:  # a kept workspace sees many shapes over its life
                self._views.clear()
            x = self.buffer(i, shape)
            self._views[key] = (x, x.unbind(-4))
        return self._views[key]

    def pairs(self, shape: tuple[int, ...]) -> tuple:
        """(a, bx, a_steps, bx_steps): buffers 0 and 1 as `shape` (see `steps`), and their c
        steps each."""
        (a, a_steps), (bx, bx_steps) = self.steps(0, shape), self.steps(1, shape)
        return a, bx, a_steps, bx_steps


# Each thread keeps its last CPU workspace of up to this many bytes for its next call. A fresh
# one per call is a large allocation that the allocator may map from the system and fault in,
# page by page, every call: at B=1, Dm=512, N=16 in chunks of 64 (4 MiB of workspace) that
# made the forward 1.7-2.2x slower at T=256 and 1.2-1.4x at T=1024 (2-core x86 VM, glibc), and
# made shorter chunks, with smaller workspaces, look faster than they are.
_KEPT_WORKSPACE_BYTES = 16 << 20
_kept = threading.local()


@contextlib.contextmanager
def _borrowed_workspace(numel: int, like: torch.Tensor, dtype: torch.dtype, count: int):
    """A `_Workspace` of `count` buffers of at least `numel` floats of `dtype` on like's
    device, for the with block: on CPU the thread's kept one (grown to fit, up to
    `_KEPT_WORKSPACE_BYTES`), or a fresh one when it is larger than that or already lent out
    (a call inside a call). Its contents are scratch: nothing in it outlives the block."""
    kept = getattr(_kept, "workspace", None)
    if like.device.type != "cpu" or (kept is not None and kept.busy):
        yield _Workspace(numel, like, dtype, count)
        return
    if kept is None or not kept.holds(numel, like.device, dtype, count):
        sizes = [(numel, count)]
        if kept is not None and kept.holds(0, like.device, dtype, count=0):
            # Of the same kind: rather one that fits this call and the ones before it.
            sizes.insert(0, (max(numel, kept.buffers[0].numel()), max(count, len(kept.buffers))))
        fitting = [(n, c) for n, c in sizes if n * c * dtype.itemsize <= _KEPT_WORKSPACE_BYTES]
        if not fitting:
            yield _Workspace(numel, like, dtype, count)
            return
        numel, count = fitting[0]
        kept = _kept.workspace = _Workspace(numel, like, dtype, count)
    kept.busy = True
    try:
        yield kept
    finally:
        kept.busy = False


def release_kept_workspace() -> None:
    """Drop the calling thread's kept workspace (see `_borrowed_workspace`): its memory goes
    back to the allocator, and the thread's next CPU call allocates a new one."""
    _kept.workspace = None


def _readout(
    C: torch.Tensor, states: torch.Tensor, L: int, out: torch.Tensor | None
) -> torch.Tensor:
    """y_j = C_j h_j for a chunk's first L tokens, one [1, N] @ [N, P] product per token and
    group: C `[b, ..., G, N]` and states `[b, ..., G, N, P]` for L or more tokens (blocks may
    pad the chunk), contiguous; written into out `[b, L, G, P]` when given."""
    b, G, N, P = C.shape[0], C.shape[-2], C.shape[-1], states.shape[-1]
    C, states = C.reshape(-1, 1, N), states.view(-1, N, P)
    if out is not None and out.is_contiguous() and C.shape[0] == out.numel() // P:
        return torch.bmm(C, states, out=out.view(-1, 1, P)).view(out.shape)
    y = torch.bmm(C, states).view(b, -1, G, P)[:, :L]
    return y if out is None else out.copy_(y)


def _token_loop_chunk(
    dt: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    h: torch.Tensor,
    workspace: _Workspace,
    out: torch.Tensor | None = None,
    readout: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One chunk of b sequences, token after token: dt, u `[b, L, G, P]`; B, C `[b, L, G, N]`;
    A `[G, N, P]` in log2 units (A log2(e)); h `[b, G, N, P]` the states entering the chunk;
    workspace with buffers of at least b L G N P floats each; out None or a `[b, L, G, P]`
    tensor for the output (dt itself may be it: it is read first); readout False skips y (None
    comes back): the token loop's backward wants only the states.

    The decays a_j = 2^(dt_j A) and inputs B_j x_j of the whole chunk take one op each, the
    recurrence one foreach call (`_foreach_recurrence_`), and one batched matmul reads out
    y_j = C_j h_j. States are state-major, `[N, P]` per group: channels are the contiguous
    axis, so every op runs over P-wide rows and the readout is a `[1, N] @ [N, P]` product per
    token. 64 tokens' arithmetic is ~300 us at B=1, Dm=512, N=16 and each op around it ~1-5 us,
    so the function keeps to those few. Leaves the decays and states in workspace buffers 0 and
    1, `[b, L, G, N, P]`, for `_token_loop_backward`. Returns the scan output sum_n C h
    `[b, L, G, P]` and the states leaving the chunk.
    """
    b, L, G, P = dt.shape
    N = B.shape[-1]
    a, states, a_steps, states_steps = workspace.pairs((b, L, G, N, P))
    x = dt * u
    torch.mul(dt.unsqueeze(-2), A, out=a).exp2_()
    torch.mul(B.unsqueeze(-1), x.unsqueeze(-2), out=states)
    _foreach_recurrence_(states_steps, a_steps, h)
    h = states_steps[-1].clone()  # a copy: the next chunk overwrites the workspace
    return (_readout(C, states, L, out) if readout else None), h


def _blocked_chunk(
    dt: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    h: torch.Tensor,
    num_blocks: int,
    workspace: _Workspace | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of b sequences in S = num_blocks >= 2 blocks of c tokens, scanned side by
    side: the second form of `_token_loop_chunk` (same shapes, same results), with workspace
    None under autograd, or one holding the block-padded chunk.

    Every step op works on step j of all S blocks at once, so a chunk costs 2c + S step ops
    instead of L. Pass 1 scans each block from a zero state, pass 2 carries the states from
    block to block with each block's total decay, pass 3 scans each block again from its true
    entering state, keeping every state (without autograd, one foreach call), and one batched
    matmul reads out y_j = C_j h_j for the whole chunk. Tensors stay in time order
    `[b, S, c, ...]`: step j of all blocks is S runs of G N P contiguous floats, as fast to
    work on as one, and no input or output needs a transposed copy.
    """
    b, L, G, P = dt.shape
    N = B.shape[-1]
    S = num_blocks
    c = -(-L // S)
    x = dt * u
    pad = S * c - L
    if pad:
        # dt = 0 and x = 0 is the identity step (decay 1, no input): padding leaves h as it was.
        dt, x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (dt, x, B, C))
    dt, x = dt.view(b, S, c, G, P), x.view(b, S, c, G, P)
    B, C = B.view(b, S, c, G, N), C.view(b, S, c, G, N)
    if workspace is None:
        # The pairs of every step, a = 2^(dt A) and bx = B x, one op each (their backward too);
        # exp2_ in place on the fresh product: mul's backward needs only its inputs. unbind,
        # not [:, :, j]: under autograd its backward is one stack, not c zero-filled grads.
        a, bx = (dt[..., None, :] * A).exp2_(), B[..., None] * x[..., None, :]
        a_steps, bx_steps = a.unbind(2), bx.unbind(2)
    else:
        a, bx, a_steps, bx_steps = workspace.pairs((b, S, c, G, N, P))
        torch.mul(dt[..., None, :], A, out=a).exp2_()
        torch.mul(B[..., None], x[..., None, :], out=bx)

    # 1. Each block from a zero state up to its last token (without autograd, in one buffer: a
    # fresh tensor per step costs more than the step).
    h_block = bx_steps[0]
    buffer = None if workspace is None else torch.empty_like(h_block)
    for a_j, b_j in zip(a_steps[1:], bx_steps[1:], strict=True):
        h_block = torch.addcmul(b_j, a_j, h_block, out=buffer)
    # 2. States entering each block, passed block to block with the block's log-space
    # cumulative decay 2^((sum_j dt_j) A) <= 1 for dt >= 0, never a ratio of decays: however
    # large dt |A| gets, nothing overflows and nothing divides by an underflowed product.
    total = torch.exp2(dt.sum(2)[..., None, :] * A)  # [b, S, G, N, P]
    entering = []
    for total_s, h_s in zip(total.unbind(1), h_block.unbind(1), strict=True):
        entering.append(h)
        h = torch.addcmul(h_s, total_s, h)
    h_run = torch.stack(entering, dim=1)

    # 3. Every block again from its true entering state, keeping every state. Without
    # autograd, state j overwrites bx_j, read for the last time (autograd could not go
    # through in-place updates of a buffer it saved parts of).
    if workspace is None:
        hs = []
        for a_j, b_j in zip(a_steps, bx_steps, strict=True):
            h_run = torch.addcmul(b_j, a_j, h_run)
            hs.append(h_run)
        states = torch.stack(hs, dim=2)
    else:
        _foreach_recurrence_(bx_steps, a_steps, h_run)
        states = bx
    return _readout(C, states, L, out), h


def _token_loop_backward(
    dt: torch.Tensor,
    u: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    A: torch.Tensor,
    h: torch.Tensor,
    dy: torch.Tensor,
    dh_out: torch.Tensor,
    workspace: _Workspace,
    out: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of one chunk's token loop, once `_token_loop_chunk` has put the chunk's
    decays and states in workspace buffers 0 and 1: dt, u, dy
    `[b, L, G, P]` (dy: of the scan's output sum_n C h); B, C `[b, L, G, N]`; A `[G, N, P]`
    (log2 units); h, dh_out `[b, G, N, P]`, the states entering the chunk and the gradient of
    those leaving it; out: the tensors that take the gradients of dt, u, B and C.

    Runs the adjoint recurrence dh_j = C_j dy_j + a_{j+1} dh_{j+1} from the last token back,
    one in-place op per token (in buffer 2), then finds every gradient in a few whole-chunk ops
    (buffer 3 for the last). Returns the gradients of A (`[G, N, P]`, summed over the chunk)
    and of h.
    """
    b, L, G, P = dt.shape
    N = B.shape[-1]
    shape = (b, L, G, N, P)
    a, states, a_steps, _ = workspace.pairs(shape)
    dh, dh_steps = workspace.steps(2, shape)

    torch.mul(C.unsqueeze(-1), dy.unsqueeze(-2), out=dh)
    dh_steps[-1].add_(dh_out)
    if L > 1:
        _foreach_recurrence_(dh_steps[-2::-1], a_steps[:0:-1], dh_steps[-1])

    # Every product below contracts a token's [N, P] block with a P- or N-vector: as
    # `[1, K] @ [K, M]` per token (for dB and dC against the block's transpose), the
    # batched matmul runs ~7x faster than as `[M, K] @ [K, 1]`.
    x = dt * u
    per_token = (-1, N, P)
    dx = torch.bmm(B.reshape(-1, 1, N), dh.view(per_token)).view(b, L, G, P)
    dB = torch.bmm(x.reshape(-1, 1, P), dh.view(per_token).mT).view(b, L, G, N)
    dC = torch.bmm(dy.reshape(-1, 1, P), states.view(per_token).mT).view(b, L, G, N)
    # d loss / d(dt A) = dh_j h_{j-1} a_j ln 2, h_{j-1} being the state before token j
    # (ln 2 is applied to the reduced gradients, not to this chunk-sized product).
    grad_z = workspace.buffer(3, a.shape)
    torch.mul(dh[:, 1:], states[:, :-1], out=grad_z[:, 1:])
    torch.mul(dh[:, 0], h, out=grad_z[:, 0])
    grad_z.mul_(a)
    # The states are spent: their buffer takes grad_z dt, then grad_z itself takes A.
    dA = torch.mul(grad_z, dt[..., None, :], out=states).sum((0, 1)).mul_(math.log(2.0))
    d_dt, du, d_B, d_C = out
    torch.addcmul(grad_z.mul_(A * math.log(2.0)).sum(-2), dx, u, out=d_dt)
    torch.mul(dx, dt, out=du)
    d_B.copy_(dB)
    d_C.copy_(dC)
    return dA, a[:, 0] * dh[:, 0]


def _skip_and_gate_backward(
    dy: torch.Tensor,
    y_scan: torch.Tensor | None,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dz: torch.Tensor | None,
) -> torch.Tensor:
    """The backward of y = (y_scan + D u) silu(z) on one chunk: dy, y_scan, u, z, dz
    `[b, L, G, P]`, D `[G, P]`; y_scan is overwritten (needed only with z), dz takes z's
    gradient. Returns the gradient of y_scan; u's and D's parts are the caller's."""
    if z is None:
        return dy
    y = y_scan if D is None else y_scan.addcmul_(D, u)
    torch.ops.aten.silu_backward.grad_input(dy * y, z, grad_input=dz)  # dy y silu'(z), fused
    return dy * F.silu(z)


def _skip_and_gate_(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None
) -> None:
    """`_skip_and_gate` in place on one chunk: y = (y + D u) silu(z); y, u, z `[b, L, G, P]`,
    D `[G, P]`."""
    if D is not None:
        y.addcmul_(D, u)
    if z is not None:
        y.mul_(F.silu(z))


def _carry_states(layout, h: torch.Tensor, inputs: list[torch.Tensor], scan, keep_entering=False):
    """Chunk after chunk of `layout`, carrying the states: `scan(h_k, *inputs_k)` returns
    (y_k, the states leaving chunk k) for the `active` sequences of chunk k, whose entering
    states are the first rows of h `[num_seqs, G, N, P]`; the other rows pass by.

    inputs: laid-out tensors (`layout.gather`). Returns (the y_k, the final states, and with
    keep_entering the states entering every chunk, concatenated `[sum(active), G, N, P]`).
    """
    ys, entering = [], []
    chunks = zip(layout.active, *(layout.chunks(t) for t in inputs), strict=True)
    for active, *inputs_k in chunks:
        h_k = h if active == h.shape[0] else h[:active]
        if keep_entering:
            entering.append(h_k)
        y_k, h_k = scan(h_k, *inputs_k)
        h = h_k if active == h.shape[0] else torch.cat([h_k, h[active:]])
        ys.append(y_k)
    return ys, h, (torch.cat(entering) if keep_entering else None)


class _ChunkedTokenLoop(torch.autograd.Function):
    """Every chunk's token loop (`_token_loop_chunk`), then the D skip and the silu
    gate, with a backward of its own: dt, u, z `[..., G, P]` and B, C `[..., G, N]` laid out by
    `layout` (`layout.gather`); A `[G, N, P]` (log2 units); h `[num_seqs, G, N, P]` the initial
    states; D `[G, P]`; D and z may be None. The chunks share one workspace
    (`_borrowed_workspace`) of four buffers of a chunk's b L G N P floats.
    Returns y, laid out like dt, and the final states.

    Autograd through the loop would record an op per token and reduce every broadcast product
    on its own, and a node per chunk would assemble each input's gradient with a sequence-sized
    concatenation. Here the forward keeps only its inputs and the states entering each chunk;
    the backward visits the chunks last to first, recomputing each one's states (and, with z,
    its scan output), writing its gradients in place into sequence-sized tensors and carrying
    dh between chunks. Nothing sequence-sized is made but y and the gradients.
    """

    @staticmethod
    def forward(ctx, dt, u, B, C, A, h, D, z, layout):
        y = torch.empty_like(dt)
        inputs = [dt, u, B, C, y] + ([] if z is None else [z])
        # One chunk's b L G N P floats a buffer: the first chunk is the largest.
        numel = layout.active[0] * layout.chunk * math.prod(dt.shape[-2:]) * B.shape[-1]

        # Two buffers would do here; four, the backward's, keep the thread's workspace from
        # growing between the two, which left the old one in the heap: over 21 forward and
        # backward calls at B=1, T=4096, Dm=512, N=16, 7-12 MiB more at the peak.
        with _borrowed_workspace(numel, dt, dt.dtype, count=4) as workspace:

            def scan(h_k, dt_k, u_k, B_k, C_k, y_k, z_k=None):
                h_k = _token_loop_chunk(dt_k, u_k, B_k, C_k, A, h_k, workspace, out=y_k)[1]
                _skip_and_gate_(y_k, u_k, D, z_k)
                return y_k, h_k

            _, h, entering = _carry_states(layout, h, inputs, scan, keep_entering=True)
        ctx.save_for_backward(dt, u, B, C, A, D, z, entering)
        ctx.layout, ctx.numel = layout, numel
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh):
        dt, u, B, C, A, D, z, entering = ctx.saved_tensors
        layout = ctx.layout
        with _borrowed_workspace(ctx.numel, dt, dt.dtype, count=4) as workspace:
            grads = [torch.empty_like(t) for t in (dt, u, B, C)]
            dz = None if z is None else torch.empty_like(z)
            dA, dD = torch.zeros_like(A), None if D is None else torch.zeros_like(D)
            chunks = zip(
                layout.active,
                entering.split(layout.active),
                *(layout.chunks(t) for t in (dt, u, B, C, dy, *grads)),
                *([] if z is None else [layout.chunks(z), layout.chunks(dz)]),
                strict=True,
            )
            for active, h_k, dt_k, u_k, B_k, C_k, dy_k, *rest in reversed(list(chunks)):
                grads_k, (z_k, dz_k) = rest[:4], rest[4:] or (None, None)
                # The decays and states again; with z, the scan's output too (into buffer 3).
                y_scan = None if z is None else workspace.buffer(3, dt_k.shape)
                _token_loop_chunk(dt_k, u_k, B_k, C_k, A, h_k, workspace, y_scan, z is not None)
                dy_scan = _skip_and_gate_backward(dy_k, y_scan, u_k, D, z_k, dz_k)
                args = (dt_k, u_k, B_k, C_k, A, h_k, dy_scan, dh[:active], workspace, grads_k)
                dA_k, dh_k = _token_loop_backward(*args)
                dA += dA_k
                if D is not None:
                    grads_k[1].addcmul_(dy_scan, D)
                    dD += (dy_scan * u_k).sum((0, 1))
                dh = dh_k if active == dh.shape[0] else torch.cat([dh_k, dh[active:]])
        return *grads, dA, dh, dD, dz, None


class _DenseChunks:
    """B sequences of T tokens, cut along time into chunks of `chunk` tokens (the last ragged).
    Laid out as they come, `[B, T, ...]`."""

    def __init__(self, Bsz: int, T: int, chunk_size: int):
        self.chunk = max(1, min(chunk_size, T))
        self.active = [Bsz] * (-(-T // self.chunk))
        self.order = self.unsort = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Laid-out `[B, T, ...]` -> chunk after chunk `[B, L, ...]`, views."""
        return list(x.split(self.chunk, dim=1)) if self.active else []

    def join(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """The chunks' outputs -> laid out."""
        return torch.cat(ys, dim=1)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Laid out -> `[B, T, ...]`."""
        return y


class _PackedChunks:
    """Packed sequences (B == 1, T > 0) visited chunk by chunk: step k runs chunk k of every
    sequence that has one, as a batch.

    Sequences are sorted by length, longest first, so the ones still running at step k are a
    prefix of `active[k]` sequences. Laid out step after step, `[sum(active), chunk, ...]`: one
    gather takes every step's `[active[k], chunk]` tokens from the packed rows; positions past
    a sequence's end read an appended zero row: dt = 0 and x = 0, the identity step. Outputs
    come back through one index_select.
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
        self.index = index.flatten().to(device)

        # Where packed token i lands in the laid-out rows, flattened.
        token_seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)
        offset = torch.arange(total) - starts[token_seq]
        rank = torch.argsort(order)
        first_row = torch.cumsum(torch.tensor([0, *self.active[:-1]]), 0) * L
        step = offset // L
        self.back = (first_row[step] + rank[token_seq] * L + offset % L).to(device)

        in_order = torch.equal(order, torch.arange(order.numel()))
        self.order = None if in_order else order.to(device)
        self.unsort = None if in_order else rank.to(device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Packed `[1, T, ...]` -> laid out `[sum(active), chunk, ...]`."""
        rows = torch.cat([x[0], x.new_zeros(1, *x.shape[2:])])
        return rows.index_select(0, self.index).view(-1, self.chunk, *x.shape[2:])

    def chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Laid out -> step after step `[active[k], chunk, ...]`, views."""
        return list(x.split(self.active))

    def join(self, ys: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ys)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Laid out -> packed `[1, T, ...]`."""
        return y.flatten(0, 1).index_select(0, self.back)[None]


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
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form, the CPU path: u, delta, z `[B, T, Dm]`, B, C `[B, T, G, N]`.

    Chunks of `chunk_size` tokens run one after another, carrying the states (None: 8 to 256
    tokens, fewer the more states a token has, see `_default_chunk_size`); inside a chunk,
    token after token (None), or blocks of `block_size` tokens side by side in the log-space
    form of `_blocked_chunk` (slower on the CPUs measured, see `_blocks_per_chunk`; kept as a
    second form that the tests hold to the same results). cu_seqlens (int32 `[N_seq + 1]`,
    B == 1) packs sequences along T; it is read on the host.
    Returns y `[B, T, Dm]` and the final state `[N_seq, Dm, N]` (None unless asked).

    softplus runs once on the whole sequence, where the op is wide enough to use every thread;
    so do the D skip and the silu gate without autograd. Memory: O(T Dm) for those plus
    O(chunk_size Dm N) for one chunk: one workspace that every chunk reuses. On CPU the calling
    thread keeps it for its next call when it is 16 MiB or less (`_borrowed_workspace`; about
    4 MiB at the default chunk size, 8 MiB with autograd; `release_kept_workspace` frees it).
    With autograd, the token loop (the default, `_ChunkedTokenLoop`) does the skip and the
    gate chunk by chunk, keeps only its inputs and the states entering each chunk, and its
    backward recomputes a chunk's states and runs the adjoint recurrence, chunk by chunk;
    blocks go through autograd op by op, each chunk checkpointed.
    """
    for name, value in (("chunk_size", chunk_size), ("block_size", block_size)):
        if value is not None and value < 1:
            raise ValueError(f"selective_scan_chunk_ref: {name} must be >= 1, got {value}")
    dtype = _compute_dtype(u, delta, A, B, C)
    Bsz, T, Dm = u.shape
    G, N = B.shape[2], B.shape[3]
    P = Dm // G
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    if chunk_size is None:
        running = Bsz if cu_seqlens is None else sum(n > 0 for n in lengths)
        chunk_size = _default_chunk_size(running * Dm * N, dtype.itemsize, needs_grad)
    if cu_seqlens is None:
        layout, num_seqs = _DenseChunks(Bsz, T, chunk_size), Bsz
    else:
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
    if not layout.active:
        y = u.new_zeros(Bsz, T, Dm)
        return y, (h.transpose(2, 3).reshape(num_seqs, Dm, N) if output_final_state else None)

    u_ = u.to(dtype)
    if needs_grad:
        dt = _effective_delta(delta.to(dtype), delta_bias, delta_softplus)
    elif (
        cu_seqlens is None
        and delta_bias is None
        and not delta_softplus
        and delta.dtype == dtype
        and delta.is_contiguous()
    ):
        # delta is the step as it is: read where it lies, no sequence-sized copy (y takes a
        # fresh buffer instead of overwriting it).
        dt = delta
    else:
        # Without autograd this buffer becomes y: chunk k's output overwrites chunk k's dt once
        # the scan has read it. Each fresh sequence-sized tensor is an allocation that may come
        # from the system page by page, at a cost like that of the op that fills it.
        dt = torch.empty_like(delta, dtype=dtype, memory_format=torch.contiguous_format)
        if delta_bias is None:
            dt.copy_(delta)
        else:
            torch.add(delta, delta_bias, out=dt)
        if delta_softplus:
            torch.ops.aten.softplus.out(dt, 1, 20, out=dt)
    inputs = [
        layout.gather(t)
        for t in (dt.reshape(Bsz, T, G, P), u_.reshape(Bsz, T, G, P), B.to(dtype), C.to(dtype))
    ]
    L = layout.chunk
    S = _blocks_per_chunk(L, block_size)
    if not needs_grad:
        # One workspace for every chunk: the first is the largest (most sequences, full length).
        numel = layout.active[0] * -(-L // S) * S * Dm * N
        with _borrowed_workspace(numel, u, dtype, count=2) as workspace:
            # y overwrites the laid-out dt (for dense layouts, dt itself), chunk by chunk,
            # unless dt is the caller's delta.
            def scan(h_k, dt_k, u_k, B_k, C_k, y_k):
                if S == 1:
                    return _token_loop_chunk(dt_k, u_k, B_k, C_k, A2, h_k, workspace, out=y_k)
                return _blocked_chunk(dt_k, u_k, B_k, C_k, A2, h_k, S, workspace, out=y_k)

            y = torch.empty_like(inputs[0]) if dt is delta else inputs[0]
            _, h, _ = _carry_states(layout, h, [*inputs, y], scan)
            y = layout.scatter(y).reshape(Bsz, T, Dm)
            # y is a buffer of our own: the skip and gate in place.
            if D is not None:
                y.addcmul_(D.to(dtype), u_)
            if z is not None:
                # silu(z) through the spent workspace, a slice at a time: a fresh
                # sequence-sized tensor for it would cost about as much as the gate itself.
                scratch = workspace.buffers[0]
                rows = scratch.numel() // Dm
                for y_r, z_r in zip(
                    y.view(-1, Dm).split(rows), z.reshape(-1, Dm).split(rows), strict=True
                ):
                    gate = scratch[: z_r.numel()].view(z_r.shape)
                    y_r.mul_(torch.ops.aten.silu.out(z_r.to(dtype), out=gate))
    elif S == 1:  # the token loop does the skip and the gate
        D_ = None if D is None else D.to(dtype).view(G, P)
        z_ = None if z is None else layout.gather(z.to(dtype).reshape(Bsz, T, G, P))
        y, h = _ChunkedTokenLoop.apply(*inputs, A2, h, D_, z_, layout)
        y = layout.scatter(y).reshape(Bsz, T, Dm)
    else:

        def scan(h_k, dt_k, u_k, B_k, C_k):
            args = (dt_k, u_k, B_k, C_k, A2, h_k, S, None)
            return checkpoint(_blocked_chunk, *args, use_reentrant=False)

        ys, h, _ = _carry_states(layout, h, inputs, scan)
        y = _skip_and_gate(layout.scatter(layout.join(ys)).reshape(Bsz, T, Dm), u_, D, z)
    y = y.to(u.dtype)
    if not output_final_state:
        return y, None
    if layout.unsort is not None:
        h = h[layout.unsort]
    return y, h.transpose(2, 3).reshape(num_seqs, Dm, N)
