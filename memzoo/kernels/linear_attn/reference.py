"""Plain-torch gated linear attention: the oracle for the kernels and the CPU path.

Per (sequence, head), with scale s on q and log-decay g_t <= 0 (0 without g):
    S_t = exp(g_t) S_{t-1} + k_t^T v_t            S: [K, V]
    o_t = s q_t S_t
and with `normalize=True` also
    z_t = exp(g_t) z_{t-1} + k_t                  z: [K]
    o_t = s q_t S_t / (s q_t z_t + eps)

Three forms, each checked against the others in tests:
- `linear_attn_quadratic_ref`: the `[T, T]` decay-masked attention matrix (no varlen).
- `linear_attn_recurrent_ref`: token by token through `linear_attn_step_ref`, the decode step.
- `linear_attn_chunk_ref`: the CPU path. Quadratic inside chunks of C tokens, states passed
  from chunk to chunk: memory linear in T, with a backward of its own (`_ChunkedLinearAttn`).
  Packed sequences are laid out chunk-aligned, so every chunk belongs to one sequence and all
  chunks run as one batch.
All compute in fp32 (fp64 for fp64 inputs); o comes back in v's dtype, states in fp32 (fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _initial_state(
    state: State | None, normalize: bool, shape: tuple[int, int, int, int], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S `[N, H, K, V]`, z `[N, H, K]` or None) in like's dtype; zeros without a state."""
    if state is None:
        S = like.new_zeros(shape)
        return S, S.new_zeros(shape[:3]) if normalize else None
    if normalize:
        return state[0].to(like.dtype), state[1].to(like.dtype)
    return state.to(like.dtype), None


def _causal_decay(b: torch.Tensor) -> torch.Tensor:
    """`exp(b_t - b_s)` for s <= t, else 0: `[..., L, L]` from cumulative log-decays `[..., L]`."""
    L = b.shape[-1]
    upper = torch.ones(L, L, dtype=torch.bool, device=b.device).triu(1)
    # Mask before exp: for s > t the difference is positive and may overflow.
    return (b[..., :, None] - b[..., None, :]).masked_fill_(upper, float("-inf")).exp_()


def linear_attn_quadratic_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """Parallel form through `[T, T]` matrices: q, k `[B, T, H, K]`, v `[B, T, H, V]`.

    Returns o `[B, T, H, V]` and the final state (S `[B, H, K, V]`, or (S, z `[B, H, K]`)).
    """
    dtype, out_dtype = _compute_dtype(q, k, v), v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    q = q * scale
    b = q.new_zeros(B, H, T) if g is None else g.to(dtype).transpose(1, 2).cumsum(-1)
    S0, z0 = _initial_state(initial_state, normalize, (B, H, K, V), q)

    A = (q @ k.transpose(-1, -2)) * _causal_decay(b)
    q_decayed = q * b.exp()[..., None]
    o = A @ v + q_decayed @ S0
    if normalize:
        o = o / (A.sum(-1, keepdim=True) + q_decayed @ z0[..., None] + eps)
    o = o.transpose(1, 2).to(out_dtype)
    if not output_final_state:
        return o, None
    b_last = b[..., -1:] if T > 0 else b.new_zeros(B, H, 1)
    k_decayed = k * (b_last - b).exp()[..., None]
    S = b_last.exp()[..., None] * S0 + k_decayed.transpose(-1, -2) @ v
    if not normalize:
        return o, S
    return o, (S, b_last.exp() * z0 + k_decayed.sum(-2))


def linear_attn_step_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    *,
    g: torch.Tensor | None = None,
    scale: float,
    normalize: bool = False,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, State]:
    """One token: q, k `[B, H, K]`, v `[B, H, V]`, g `[B, H]` or None, state S or (S, z).

    Returns o `[B, H, V]` and the new state (new tensors; `state` is left as it was).
    """
    dtype, out_dtype = _compute_dtype(q, k, v), v.dtype
    q, k, v = q.to(dtype) * scale, k.to(dtype), v.to(dtype)
    S, z = (state[0], state[1]) if normalize else (state, None)
    S = S.to(dtype)
    decay = None if g is None else g.to(dtype).exp()
    if decay is not None:
        S = decay[..., None, None] * S
    S = S + k[..., :, None] * v[..., None, :]
    o = (q[..., None, :] @ S)[..., 0, :]
    if not normalize:
        return o.to(out_dtype), S
    z = z.to(dtype)
    if decay is not None:
        z = decay[..., None] * z
    z = z + k
    o = o / ((q * z).sum(-1, keepdim=True) + eps)
    return o.to(out_dtype), (S, z)


def linear_attn_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Token by token through `linear_attn_step_ref`: q, k `[B, T, H, K]`, v `[B, T, H, V]`.

    cu_seqlens (int32 `[N + 1]`, B == 1) packs sequences along T, each with its own state.
    Returns o `[B, T, H, V]` and the final state (`[N, H, K, V]`, or the pair with z `[N, H, K]`).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = _compute_dtype(q, k, v)
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    N = B if cu_seqlens is None else len(offsets) - 1
    S0, z0 = _initial_state(initial_state, normalize, (N, H, K, V), q.new_empty(0, dtype=dtype))
    # Without cu_seqlens the batch runs as one "sequence" of width B.
    seqs = [slice(0, N)] if cu_seqlens is None else [slice(n, n + 1) for n in range(N)]
    outputs, finals = [], []
    for n, (start, end) in zip(seqs, zip(offsets[:-1], offsets[1:], strict=True), strict=True):
        state = (S0[n], z0[n]) if normalize else S0[n]
        for t in range(start, end):
            o_t, state = linear_attn_step_ref(
                q[:, t],
                k[:, t],
                v[:, t],
                state,
                g=None if g is None else g[:, t],
                scale=scale,
                normalize=normalize,
                eps=eps,
            )
            outputs.append(o_t)
        finals.append(state)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    if not output_final_state:
        return o, None
    if normalize:
        return o, (torch.cat([S for S, _ in finals]), torch.cat([z for _, z in finals]))
    return o, torch.cat(finals)


# --------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------


class _DenseChunks:
    """B sequences of T tokens: chunk j of sequence b is chunk b * NC + j, zeros pad the end."""

    def __init__(self, B: int, T: int, chunk_size: int):
        self.B, self.T = B, T
        # A sequence shorter than a chunk needs no full chunk of padding.
        self.chunk = max(1, min(chunk_size, T))
        self.per_sequence = -(-T // self.chunk)
        self.num_chunks = B * self.per_sequence

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, H, D]` -> `[num_chunks, H, C, D]`."""
        H, D = x.shape[2], x.shape[3]
        pad = self.per_sequence * self.chunk - self.T
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(self.num_chunks, self.chunk, H, D).transpose(1, 2).contiguous()

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """`[num_chunks, H, C, D]` -> `[B, T, H, D]`."""
        H, D = y.shape[1], y.shape[3]
        y = y.transpose(1, 2).reshape(self.B, self.per_sequence * self.chunk, H, D)
        return y[:, : self.T]

    def pass_states(
        self, dS: torch.Tensor, decay: torch.Tensor | None, S0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States entering each chunk `[num_chunks, H, ...]` and final states `[B, H, ...]`.

        dS: `[num_chunks, H, ...]` what each chunk adds, decayed to its end (`[K, V]` states);
        decay: `[num_chunks, H]` the chunk's total decay exp(b_L), or None; S0: `[B, H, ...]`.
        """
        if self.per_sequence == 0:
            return dS, S0
        # unbind, not dS[:, j]: the backward of T / C selects would zero-fill T / C full-size
        # gradients (quadratic in T); unbind's backward is one stack.
        dS_steps = self._steps(dS)
        decay_steps = None if decay is None else self._steps(_broadcastable(decay, dS))
        S, entering = S0, []
        for j in range(self.per_sequence):
            entering.append(S)
            S = dS_steps[j] + S if decay is None else torch.addcmul(dS_steps[j], decay_steps[j], S)
        return torch.stack(entering, dim=1).flatten(0, 1), S

    def pass_state_grads(
        self, dS_own: torch.Tensor, decay: torch.Tensor | None, dS_final: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse of `pass_states`: gradients of the states leaving each chunk
        `[num_chunks, H, ...]` and of the initial states `[B, H, ...]`.

        dS_own: `[num_chunks, H, ...]` the gradient a chunk's own outputs send to the state
        entering it; decay as in `pass_states`; dS_final: `[B, H, ...]` that of the final states.
        """
        if self.per_sequence == 0:
            return dS_own, dS_final
        own_steps = self._steps(dS_own)
        decay_steps = None if decay is None else self._steps(_broadcastable(decay, dS_own))
        dS, leaving = dS_final, [dS_final] * self.per_sequence
        for j in reversed(range(self.per_sequence)):
            leaving[j] = dS
            if decay is None:
                dS = own_steps[j] + dS
            else:
                dS = torch.addcmul(own_steps[j], decay_steps[j], dS)
        return torch.stack(leaving, dim=1).flatten(0, 1), dS

    def _steps(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`[num_chunks, ...]` -> per_sequence tensors `[B, ...]`, one per chunk index."""
        return x.view(self.B, self.per_sequence, *x.shape[1:]).unbind(1)


class _PackedChunks:
    """Packed sequences laid out chunk-aligned: sequence n owns chunks first[n] + 0 .. nc[n] - 1.

    `dest[i]` is the padded position (chunk * C + offset) of packed token i. State passing
    visits chunk j of every sequence that has one at step j; sequences are sorted by chunk count
    (longest first) so that the active ones at each step are a prefix, `active[j]` of them.
    """

    def __init__(self, lengths: list[int], chunk_size: int, device: torch.device):
        lens = torch.tensor(lengths, dtype=torch.int64)
        self.chunk = C = max(1, min(chunk_size, max(lengths)))
        nc = (lens + C - 1) // C
        first = torch.cumsum(nc, 0) - nc
        seq = torch.repeat_interleave(torch.arange(len(lengths)), lens)
        dest = first[seq] * C + torch.arange(seq.numel()) - (torch.cumsum(lens, 0) - lens)[seq]
        self.num_chunks = int(nc.sum())
        self.dest = dest.to(device)

        order = torch.argsort(nc, descending=True, stable=True)
        nc_sorted = nc[order]
        steps = torch.arange(int(nc_sorted[0]))
        is_active = (steps < nc_sorted[:, None]).T  # [steps, N]
        step_chunks = (first[order][None, :] + steps[:, None])[is_active]
        self.active: list[int] = is_active.sum(1).tolist()
        self.step_chunks = step_chunks.to(device)
        in_order = torch.equal(order, torch.arange(order.numel()))
        self.order = None if in_order else order.to(device)
        self.unsort = None if in_order else torch.argsort(order).to(device)
        # Entering states come out step by step; this gather puts them in chunk order.
        in_chunk_order = torch.equal(step_chunks, torch.arange(step_chunks.numel()))
        self.to_chunk_order = None if in_chunk_order else torch.argsort(step_chunks).to(device)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """Packed tokens `[1, T, H, D]` -> `[num_chunks, H, C, D]`, zeros as padding."""
        H, D = x.shape[2], x.shape[3]
        padded = x.new_zeros(self.num_chunks * self.chunk, H, D)
        padded = padded.index_copy(0, self.dest, x.reshape(-1, H, D))
        return padded.view(self.num_chunks, self.chunk, H, D).transpose(1, 2).contiguous()

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """`[num_chunks, H, C, D]` -> packed tokens `[1, T, H, D]`."""
        H, D = y.shape[1], y.shape[3]
        flat = y.transpose(1, 2).reshape(self.num_chunks * self.chunk, H, D)
        return flat.index_select(0, self.dest)[None]

    def pass_states(
        self, dS: torch.Tensor, decay: torch.Tensor | None, S0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_DenseChunks.pass_states`, for N packed sequences (S0 `[N, H, ...]`)."""
        S = S0 if self.order is None else S0[self.order]
        # One gather and a split (not an index per step, whose backward would zero-fill a
        # full-size gradient at every step).
        dS_steps = dS[self.step_chunks].split(self.active)
        if decay is not None:
            decay_steps = _broadcastable(decay, dS)[self.step_chunks].split(self.active)
        N, entering = S.shape[0], []
        for j, active in enumerate(self.active):
            S_active = S[:active]
            entering.append(S_active)
            if decay is None:
                S_active = dS_steps[j] + S_active
            else:
                S_active = torch.addcmul(dS_steps[j], decay_steps[j], S_active)
            S = S_active if active == N else torch.cat([S_active, S[active:]])
        final = S if self.unsort is None else S[self.unsort]
        if not entering:
            return dS, final
        S_in = torch.cat(entering)
        return (S_in if self.to_chunk_order is None else S_in[self.to_chunk_order]), final

    def pass_state_grads(
        self, dS_own: torch.Tensor, decay: torch.Tensor | None, dS_final: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_DenseChunks.pass_state_grads`, for N packed sequences (dS_final `[N, H, ...]`)."""
        if not self.active:
            return dS_own, dS_final
        dS = dS_final if self.order is None else dS_final[self.order]
        own_steps = dS_own[self.step_chunks].split(self.active)
        if decay is not None:
            decay_steps = _broadcastable(decay, dS_own)[self.step_chunks].split(self.active)
        N, leaving = dS.shape[0], [dS] * len(self.active)
        for j in reversed(range(len(self.active))):
            active = self.active[j]
            dS_active = dS[:active]
            leaving[j] = dS_active
            if decay is None:
                dS_active = own_steps[j] + dS_active
            else:
                dS_active = torch.addcmul(own_steps[j], decay_steps[j], dS_active)
            dS = dS_active if active == N else torch.cat([dS_active, dS[active:]])
        dS_leaving = torch.cat(leaving)
        if self.to_chunk_order is not None:
            dS_leaving = dS_leaving[self.to_chunk_order]
        return dS_leaving, (dS if self.unsort is None else dS[self.unsort])


def _broadcastable(decay: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """`[num_chunks, H]` decays as `[num_chunks, H, 1, ...]`, to scale `states`."""
    return decay.view(*decay.shape, *([1] * (states.dim() - decay.dim())))


def _default_chunk_size(K: int, V: int) -> int:
    """Tokens per chunk when chunk_size is None: 32 for states `[K, V]` smaller than 64 x 64,
    else 64.

    Per token, a chunk's `[C, C]` attention costs about C and its state K V / C. On a 2-core x86
    VM, at K = V = 32 (Mamba-2 tiny's SSD) chunks of 32 run the forward 1.45x and forward +
    backward 1.15x faster than chunks of 64; at K = V = 64 the two tie, and at K = 128, V = 64
    chunks of 64 are 5-8% faster.
    """
    return 32 if K * V < 64 * 64 else 64


def _chunk_forward(q, k, v, g, S0, scale, layout, keep: bool):
    """The chunked forward: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` or None,
    S0 `[N, H, K, V]`, all in the compute dtype; q is scaled by `scale` here.

    Returns o `[B, T, H, V]`, the final states `[N, H, K, V]`, and with `keep` what the backward
    reads (else ()): the chunked q (scaled), k and v `[NC, H, C, D]`, the decayed attention
    A = (Q K^T) ⊙ M and M itself `[NC, H, C, C]`, the row scales exp(b) and exp(b_L - b)
    `[NC, H, C, 1]`, the chunks' total decays exp(b_L) `[NC, H]` and the states entering each
    chunk `[NC, H, K, V]` (M, the scales and the decays None without g).
    """
    # The scaled q is a temporary: scaling in the caller would keep it alive through the call.
    qc = layout.to_chunks(q * scale)
    kc, vc = layout.to_chunks(k), layout.to_chunks(v)
    A = qc @ kc.transpose(-1, -2)  # [NC, H, C, C], a fresh tensor: masked in place
    if g is None:
        A, M, q_scale, k_scale, decay = A.tril_(), None, None, None, None
    else:
        # Padding has g = 0, so b is flat after a ragged chunk's last token and b_L is its value.
        b = layout.to_chunks(g[..., None])[..., 0].cumsum(-1)  # [NC, H, C]
        b_last = b[..., -1:]
        M = _causal_decay(b)
        A = A.mul_(M)
        q_scale, k_scale = b.exp()[..., None], (b_last - b).exp()[..., None]
        decay = b_last[..., 0].exp()
    saved = (qc, kc, vc, A, M, q_scale, k_scale, decay) if keep else ()
    # Tensors of T x H x (C or D) floats go as soon as they are spent: they set the peak.
    del M
    qd = qc if q_scale is None else qc * q_scale
    del qc
    kd = kc if k_scale is None else kc * k_scale
    del kc
    S_in, S_final = layout.pass_states(kd.transpose(-1, -2) @ vc, decay, S0)
    del kd
    # o = (Q * exp(b)) S_in + A V: one product, then the other added into it.
    oc = torch.bmm(qd.flatten(0, 1), S_in.flatten(0, 1))
    del qd
    oc = oc.baddbmm_(A.flatten(0, 1), vc.flatten(0, 1)).view(vc.shape)
    return layout.from_chunks(oc), S_final, ((*saved, S_in) if keep else ())


class _ChunkedLinearAttn(torch.autograd.Function):
    """`_chunk_forward` with a backward of its own (ALGORITHMS.md, chunked gated linear
    attention): per chunk, dA = (dO V^T) ⊙ M, dQ = dA K + (dO S_in^T) * exp(b),
    dK = dA^T Q + (V dS_out^T) * exp(b_L - b), dV = A^T dO + (K * exp(b_L - b)) dS_out, with
    dS_out (the gradient of the state leaving a chunk) passed from the last chunk to the first.
    The decay's gradient needs no derivative of any exponential: with B_t the cumulative
    log-decay of the sequence, dL/dB_t = q_t · dq_t - k_t · dk_t (+ <dS_final, S_final> at the
    last token), and dg is its reverse cumulative sum within each sequence.

    Autograd through the forward would save more tensors and take about twice as many passes
    over the `[NC, H, C, C]` ones (the decay mask's exp, masked_fill and broadcast subtraction
    each have a backward), each a fresh allocation.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, S0, scale, layout):
        o, S_final, saved = _chunk_forward(q, k, v, g, S0, scale, layout, keep=True)
        ctx.layout, ctx.scale = layout, scale
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*saved, S_final)
        return o, S_final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS_final):
        qc, kc, vc, A, M, q_scale, k_scale, decay, S_in, S_final = ctx.saved_tensors
        layout = ctx.layout
        doc = torch.zeros_like(vc) if do is None else layout.to_chunks(do)  # [NC, H, C, V]
        if dS_final is None:
            dS_final = torch.zeros_like(S_final)
        # The saved tensors live until this returns; the backward's own T x H x (C or D)
        # tensors go as soon as they are spent, in the order that keeps the fewest alive.
        qd = qc if decay is None else qc * q_scale
        dS_out, dS0 = layout.pass_state_grads(qd.transpose(-1, -2) @ doc, decay, dS_final)
        del qd
        kd = kc if decay is None else kc * k_scale
        dvc = torch.bmm(kd.flatten(0, 1), dS_out.flatten(0, 1))
        del kd
        dvc = dvc.baddbmm_(A.flatten(0, 1).transpose(1, 2), doc.flatten(0, 1)).view(vc.shape)
        dv = layout.from_chunks(dvc)
        del dvc
        dkc = vc @ dS_out.transpose(-1, -2)
        del dS_out
        dqc = doc @ S_in.transpose(-1, -2)
        if decay is not None:
            dqc, dkc = dqc.mul_(q_scale), dkc.mul_(k_scale)
        dA = doc @ vc.transpose(-1, -2)  # [NC, H, C, C], fresh: masked in place
        del doc
        dA = dA.tril_() if M is None else dA.mul_(M)
        dqc = dqc.flatten(0, 1).baddbmm_(dA.flatten(0, 1), kc.flatten(0, 1)).view(qc.shape)
        dkc = dkc.flatten(0, 1).baddbmm_(dA.flatten(0, 1).transpose(1, 2), qc.flatten(0, 1))
        dkc = dkc.view(kc.shape)
        del dA

        dg = None
        if decay is not None and ctx.needs_input_grad[3]:
            dB = (qc * dqc).sum(-1) - (kc * dkc).sum(-1)  # [NC, H, C]
            # Suffix sums: within each chunk, then the totals of the sequence's later chunks
            # (and the final state's term), passed back chunk to chunk like a state gradient.
            dg = dB.flip(-1).cumsum(-1).flip(-1)
            final = (dS_final * S_final).sum((-2, -1))  # [N, H]
            later, _ = layout.pass_state_grads(dg[..., 0], None, final)
            dg = layout.from_chunks((dg + later[..., None])[..., None])[..., 0]
        if ctx.scale != 1.0:  # the gradient of q before scaling
            dqc = dqc.mul_(ctx.scale)
        dq = layout.from_chunks(dqc)
        del dqc
        return dq, layout.from_chunks(dkc), dv, dg, dS0, None, None


def linear_attn_chunk_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked form, the CPU path: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]`.

    chunk_size: tokens per chunk; None picks 32 or 64 from the state size (`_default_chunk_size`).

    cu_seqlens (int32 `[N + 1]`, B == 1) packs sequences along T; it is read on the host.
    Returns o `[B, T, H, V]` and the final state (`[N, H, K, V]`, or the pair with z `[N, H, K]`).
    Memory is O(T (C + K V / C)) per head; nothing is `[T, T]`. Under autograd the chunks go
    through `_ChunkedLinearAttn`, whose backward is written out rather than traced.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_attn_chunk_ref: chunk_size must be >= 1, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if chunk_size is None:
        chunk_size = _default_chunk_size(K, V)
    dtype, out_dtype = _compute_dtype(q, k, v), v.dtype
    if cu_seqlens is None:
        layout = _DenseChunks(B, T, chunk_size)
        N = B
    else:
        offsets = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:], strict=True)]
        layout, N = _PackedChunks(lengths, chunk_size, q.device), len(lengths)

    v = v.to(dtype)
    S0, z0 = _initial_state(initial_state, normalize, (N, H, K, V), v)
    if normalize:
        # z is S for values of ones: carry it as an extra value column, [S | z] `[K, V + 1]`.
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        S0 = torch.cat([S0, z0[..., None]], dim=-1)
    inputs = (q.to(dtype), k.to(dtype), v, None if g is None else g.to(dtype), S0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        o, S_final = _ChunkedLinearAttn.apply(*inputs, scale, layout)
    else:
        o, S_final, _ = _chunk_forward(*inputs, scale, layout, keep=False)
    if normalize:
        o = o[..., :V] / (o[..., V:] + eps)
    o = o.to(out_dtype).contiguous()  # a ragged last chunk leaves a strided slice
    if not output_final_state:
        return o, None
    if normalize:
        return o, (S_final[..., :V].contiguous(), S_final[..., V].contiguous())
    return o, S_final
