"""Mixture-of-Memories kernels: routing invariants, Triton (interpreter) == torch references on
forward and gradients, the memories' attention against a token-by-token oracle, and no host
syncs (the torch paths compile with fullgraph=True)."""

import pytest
import torch

from memzoo.kernels.mom import (
    MemoryGrouping,
    gather,
    group_by_memory,
    memory_attn,
    memory_attn_step,
    route,
    scatter_weighted,
)
from memzoo.kernels.mom.reference import memory_attn_recurrent_ref
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn

BACKENDS = ["torch", "triton"]
F64 = 1e-12
F32 = 1e-5


def routing(B, T, M, k, *, seed, dtype=torch.float32):
    """(logits, weights, indices) of random router logits."""
    logits = randn(B, T, M, seed=seed, dtype=dtype)
    weights, indices = route(logits, k, backend="torch")
    return logits, weights, indices


def copy_keys(indices, cu_seqlens=None):
    """(sequence * M + memory, token row) of every copy, as flat int64 tensors (M from caller)."""
    B, T, k = indices.shape
    rows = torch.arange(B * T)
    seq = rows // T if cu_seqlens is None else torch.searchsorted(cu_seqlens[1:], rows, right=True)
    return seq.repeat_interleave(k), rows.repeat_interleave(k)


# ----------------------------------------------------------------------------------------
# route
# ----------------------------------------------------------------------------------------


def test_route_picks_the_most_probable_and_renormalises():
    logits = randn(2, 9, 6, seed=0)
    weights, indices = route(logits, 3)
    probs = logits.softmax(-1)
    expected = probs.topk(3, dim=-1)
    assert torch.equal(indices, expected.indices)
    assert_close("weights", expected.values / expected.values.sum(-1, keepdim=True), weights, 1e-6)
    assert_close("sum over k", torch.ones(2, 9), weights.sum(-1), 1e-6)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "B,T,M,k", [(1, 1, 1, 1), (2, 37, 4, 2), (1, 70, 9, 3), (1, 5, 6, 6)],
    ids=["B1-T1-M1-k1", "B2-T37-M4-k2", "B1-T70-M9-k3", "B1-T5-M6-k6"],
)  # fmt: skip
def test_route_triton_matches_reference(B, T, M, k, dtype):
    logits = randn(B, T, M, seed=M + T, dtype=dtype)
    cotangent = randn(B, T, k, seed=1, dtype=torch.float64)

    def run(backend):
        leaf = logits.detach().requires_grad_()
        weights, indices = route(leaf, k, backend=backend)
        (weights.double() * cotangent).sum().backward()
        return weights, indices, leaf.grad

    weights, indices, dlogits = run("triton")
    ref_weights, ref_indices, ref_dlogits = run("torch")
    assert torch.equal(indices, ref_indices)
    assert weights.dtype == torch.float32 and dlogits.dtype == dtype
    assert_close("weights", ref_weights, weights, 1e-6)
    assert_close("dlogits", ref_dlogits, dlogits, 1e-5 if dtype == torch.float32 else 2e-3)


# ----------------------------------------------------------------------------------------
# group_by_memory: invariants on both backends, and Triton == torch exactly
# ----------------------------------------------------------------------------------------

# id -> (B, T, M, k, packed sequence lengths or None)
GROUPINGS = {
    "B2-T37-M4-k2": (2, 37, 4, 2, None),
    "B1-T130-M5-k3": (1, 130, 5, 3, None),
    "B3-T1-M1-k1": (3, 1, 1, 1, None),
    "varlen-5-0-70-1": (1, 76, 4, 2, [5, 0, 70, 1]),
}


def grouped(key, backend):
    B, T, M, k, lengths = GROUPINGS[key]
    _, _, indices = routing(B, T, M, k, seed=T)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    return indices, M, cu, group_by_memory(indices, M, cu_seqlens=cu, backend=backend)


@pytest.mark.parametrize("key", GROUPINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouping_holds_every_copy_once(key, backend):
    indices, _, _, groups = grouped(key, backend)
    P = indices.numel()
    assert torch.equal(groups.perm.sort().values, torch.arange(P))
    assert torch.equal(groups.perm[groups.inverse], torch.arange(P))
    assert torch.equal(groups.inverse[groups.perm], torch.arange(P))


@pytest.mark.parametrize("key", GROUPINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouping_offsets_match_counts(key, backend):
    indices, M, cu, groups = grouped(key, backend)
    seq, _ = copy_keys(indices, cu)
    keys = seq * M + indices.flatten()
    N = indices.shape[0] if cu is None else cu.numel() - 1
    counts = torch.bincount(keys, minlength=N * M)
    assert groups.cu_seqlens.dtype == torch.int32
    assert torch.equal(groups.cu_seqlens.long().diff(), counts)
    assert groups.cu_seqlens[0] == 0 and groups.cu_seqlens[-1] == indices.numel()


@pytest.mark.parametrize("key", GROUPINGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouping_orders_each_group_by_time(key, backend):
    indices, M, cu, groups = grouped(key, backend)
    seq, row = copy_keys(indices, cu)
    keys = (seq * M + indices.flatten())[groups.perm]
    rows = row[groups.perm]
    # Along the grouped order keys never decrease, and inside a key time strictly increases.
    assert bool((keys.diff() >= 0).all())
    same_group = keys.diff() == 0
    assert bool((rows.diff()[same_group] > 0).all())
    # Group g's span of the grouped order holds exactly the copies with key g.
    position_keys = torch.repeat_interleave(
        torch.arange(groups.cu_seqlens.numel() - 1), groups.cu_seqlens.long().diff()
    )
    assert torch.equal(keys, position_keys)


@pytest.mark.parametrize("key", GROUPINGS)
def test_grouping_triton_equals_reference(key):
    _, _, _, ref = grouped(key, "torch")
    _, _, _, out = grouped(key, "triton")
    for name in ("perm", "inverse", "cu_seqlens"):
        assert torch.equal(getattr(ref, name), getattr(out, name)), name


# ----------------------------------------------------------------------------------------
# gather / scatter_weighted
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_memory", [False, True], ids=["shared-row", "per-memory-row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gather_triton_matches_reference(per_memory, dtype):
    B, T, M, k, F = 2, 19, 4, 2, 40
    _, _, indices = routing(B, T, M, k, seed=3)
    groups = group_by_memory(indices, M)
    shape = (B, T, M, F) if per_memory else (B, T, F)
    x = randn(*shape, seed=4, dtype=dtype)
    cotangent = randn(B * T * k, F, seed=5, dtype=torch.float64)

    def run(backend):
        leaf = x.detach().requires_grad_()
        out = gather(leaf, groups, backend=backend)
        (out.double() * cotangent).sum().backward()
        return out, leaf.grad

    out, dx = run("triton")
    ref, ref_dx = run("torch")
    assert out.dtype == dtype and torch.equal(out, ref)
    assert_close("dx", ref_dx, dx, 1e-6 if dtype == torch.float32 else 1e-3)


def test_gather_moves_each_token_row_to_its_copies():
    B, T, M, k = 1, 6, 3, 2
    _, _, indices = routing(B, T, M, k, seed=6)
    groups = group_by_memory(indices, M)
    token = torch.arange(float(B * T)).view(B, T, 1)
    memory = torch.arange(float(M)).expand(B, T, M)[..., None]
    # Grouped row p is copy perm[p]: token perm[p] // k, memory indices[perm[p]].
    assert torch.equal(gather(token, groups)[:, 0], (groups.perm // k).float())
    assert torch.equal(gather(memory, groups)[:, 0], indices.flatten()[groups.perm].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_scatter_weighted_triton_matches_reference(dtype):
    B, T, M, k, F = 2, 23, 5, 3, 33
    logits, _, indices = routing(B, T, M, k, seed=8)
    weights = route(logits, k)[0]
    groups = group_by_memory(indices, M)
    y = randn(B * T * k, F, seed=9, dtype=dtype)
    cotangent = randn(B, T, F, seed=10, dtype=torch.float64)

    def run(backend):
        y_leaf, w_leaf = y.detach().requires_grad_(), weights.detach().requires_grad_()
        out = scatter_weighted(y_leaf, groups, w_leaf, backend=backend)
        (out.double() * cotangent).sum().backward()
        return out, y_leaf.grad, w_leaf.grad

    out, dy, dw = run("triton")
    ref, ref_dy, ref_dw = run("torch")
    ratio = 1e-6 if dtype == torch.float32 else 2e-3
    assert out.dtype == dtype
    assert_close("out", ref, out, ratio)
    assert_close("dy", ref_dy, dy, ratio)
    assert_close("dweights", ref_dw, dw, ratio)


def test_scatter_weighted_undoes_gather():
    B, T, M, k, F = 2, 11, 4, 2, 7
    _, weights, indices = routing(B, T, M, k, seed=11)
    groups = group_by_memory(indices, M)
    x = randn(B, T, F, seed=12)
    # The k weights of a token sum to 1, so gathering its row to k copies and summing back
    # returns the row.
    assert_close("roundtrip", x, scatter_weighted(gather(x, groups), groups, weights), 1e-6)


# ----------------------------------------------------------------------------------------
# memory_attn
# ----------------------------------------------------------------------------------------


def attn_inputs(B, T, M, H, K, V, k, *, seed, N=None, use_g=True):
    """fp64 q, k, v, g, weights, indices, initial state."""
    f64 = torch.float64
    q = randn(B, T, H, K, seed=seed, dtype=f64)
    keys = randn(B, T, M, H, K, seed=seed + 1, dtype=f64)
    values = randn(B, T, M, H, V, seed=seed + 2, dtype=f64)
    g = -randn(B, T, M, H, seed=seed + 3, dtype=f64).abs() * 0.3 if use_g else None
    _, weights, indices = routing(B, T, M, k, seed=seed + 4, dtype=f64)
    state = randn(N or B, M, H, K, V, seed=seed + 5, scale=0.5, dtype=f64)
    return q, keys, values, g, weights, indices, state


@pytest.mark.parametrize("method", ["masked", "grouped"])
@pytest.mark.parametrize("use_g", [True, False], ids=["gla", "no-decay"])
def test_memory_attn_equals_token_by_token(method, use_g):
    q, k, v, g, w, idx, h0 = attn_inputs(2, 21, 4, 2, 3, 5, 2, seed=0, use_g=use_g)
    o, final = memory_attn(
        q, k, v, g, w, idx, initial_state=h0, output_final_state=True, method=method
    )
    o_ref, final_ref = memory_attn_recurrent_ref(
        q, k, v, g, w, idx, scale=3**-0.5, initial_state=h0
    )
    assert_close("o", o_ref, o, F64)
    assert_close("final_state", final_ref, final, F64)


@pytest.mark.parametrize("method", ["masked", "grouped"])
def test_memory_attn_varlen_equals_per_sequence(method):
    lengths = [7, 1, 0, 12]
    q, k, v, g, w, idx, h0 = attn_inputs(1, sum(lengths), 3, 2, 4, 4, 2, seed=1, N=len(lengths))
    cu = cu_seqlens_from_lengths(lengths)
    o, final = memory_attn(
        q, k, v, g, w, idx, initial_state=h0, output_final_state=True, cu_seqlens=cu,
        method=method,
    )  # fmt: skip
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        part = [t[:, start:end] for t in (q, k, v, g, w, idx)]
        o_n, final_n = memory_attn(*part, initial_state=h0[n : n + 1], output_final_state=True)
        assert_close(f"o of sequence {n}", o_n, o[:, start:end], F64)
        assert_close(f"final state of sequence {n}", final_n, final[n : n + 1], F64)


def test_memory_attn_step_updates_only_routed_memories():
    q, k, v, g, w, idx, h0 = attn_inputs(3, 1, 5, 2, 3, 4, 2, seed=2)
    o, state = memory_attn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], w[:, 0], idx[:, 0], h0)
    o_ref, state_ref = memory_attn_recurrent_ref(
        q, k, v, g, w, idx, scale=3**-0.5, initial_state=h0
    )
    assert_close("o", o_ref[:, 0], o, F64)
    assert_close("state", state_ref, state, F64)
    untouched = torch.ones(3, 5, dtype=torch.bool).scatter(1, idx[:, 0], False)
    assert torch.equal(state[untouched], h0[untouched])
    assert not torch.equal(state[~untouched], h0[~untouched])


@pytest.mark.parametrize(
    "B,T,M,k,lengths", [(2, 40, 3, 2, None), (1, 45, 4, 1, [30, 0, 15])],
    ids=["B2-T40-M3-k2", "varlen-30-0-15-M4-k1"],
)  # fmt: skip
def test_memory_attn_triton_matches_reference(B, T, M, k, lengths):
    N = B if lengths is None else len(lengths)
    inputs = attn_inputs(B, T, M, 2, 8, 8, k, seed=3, N=N)
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    names = ["q", "k", "v", "g", "weights", "initial_state"]

    def run(backend, dtype):
        q, keys, v, g, w, idx, h0 = inputs
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, keys, v, g, w, h0)]
        o, final = memory_attn(
            *leaves[:5], idx, initial_state=leaves[5], output_final_state=True, cu_seqlens=cu,
            backend=backend,
        )  # fmt: skip
        loss = (o.double() * randn(*o.shape, seed=20, dtype=torch.float64)).sum()
        loss = loss + (final.double() * randn(*final.shape, seed=21, dtype=torch.float64)).sum()
        loss.backward()
        return o, final, [t.grad for t in leaves]

    o, final, grads = run("triton", torch.float32)
    o_ref, final_ref, grads_ref = run("torch", torch.float64)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", final_ref, final, 1e-5)
    for name, ref, out in zip(names, grads_ref, grads, strict=True):
        assert_close(f"d{name}", ref, out, 1e-5)


# ----------------------------------------------------------------------------------------
# No host syncs, and errors
# ----------------------------------------------------------------------------------------


def test_routing_and_memory_attn_compile_without_graph_breaks():
    q, k, v, g, _, _, h0 = attn_inputs(2, 12, 4, 2, 4, 4, 2, seed=4)
    logits = randn(2, 12, 4, seed=5, dtype=torch.float64)

    def layer(q, k, v, g, logits, h0):
        weights, indices = route(logits, 2)
        groups = group_by_memory(indices, 4)
        back = scatter_weighted(gather(q.flatten(2), groups), groups, weights)
        o, final = memory_attn(
            q, k, v, g, weights, indices, initial_state=h0, output_final_state=True
        )
        return o, final, back

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    for name, ref, out in zip(
        ["o", "final", "roundtrip"], layer(q, k, v, g, logits, h0),
        compiled(q, k, v, g, logits, h0), strict=True,
    ):  # fmt: skip
        assert_close(name, ref, out, F64)


@pytest.mark.gpu
def test_cuda_grouped_path_never_syncs():
    q, k, v, g, w, idx, h0 = (t.cuda() for t in attn_inputs(2, 300, 4, 2, 16, 16, 2, seed=6))
    as_float = [t.float() for t in (q, k, v, g, w, h0)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, final = memory_attn(
            *as_float[:5], idx, initial_state=as_float[5], output_final_state=True
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    o_ref, final_ref = memory_attn(q, k, v, g, w, idx, initial_state=h0, output_final_state=True)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", final_ref, final, 1e-5)


def test_bad_inputs_raise_clearly():
    _, weights, indices = routing(1, 4, 3, 2, seed=7)
    with pytest.raises(ValueError, match="topk must be at most 3"):
        route(randn(1, 4, 3, seed=0), 4)
    with pytest.raises(TypeError, match="indices must have dtype"):
        group_by_memory(indices.int(), 3)
    with pytest.raises(TypeError, match="grouping must be the MemoryGrouping"):
        gather(randn(1, 4, 5, seed=1), (indices,))
    groups = group_by_memory(indices, 3)
    assert isinstance(groups, MemoryGrouping)
    with pytest.raises(ValueError, match=r"y must have shape \[P=8, F\]"):
        scatter_weighted(randn(7, 5, seed=2), groups, weights)
    q, k, v, g, w, idx, _ = attn_inputs(1, 4, 3, 1, 2, 2, 2, seed=8)
    with pytest.raises(ValueError, match="method must be one of"):
        memory_attn(q, k, v, g, w, idx, method="dense")


@pytest.mark.device_assert
def test_bad_values_raise_clearly():
    _, _, indices = routing(1, 4, 3, 2, seed=7)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_memories=2\)"):
        group_by_memory(indices, 2)
    with pytest.raises(ValueError, match="k indices must differ"):
        group_by_memory(torch.zeros(1, 4, 2, dtype=torch.int64), 3)
    q, k, v, g, w, idx, _ = attn_inputs(1, 4, 3, 1, 2, 2, 2, seed=8)
    with pytest.raises(ValueError, match="g is a log-decay and must be <= 0"):
        memory_attn(q, k, v, -g, w, idx)
