"""The FFN sub-blocks (`mlp`, `swiglu`, `moe`): hand-written formulas, the mixer contract, and
the chunk-level MoE's causal routing and load-balancing loss."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn
from memzoo.models.ffn import FFNS, MLP, ChunkMoE, SwiGLU, build_ffn, swiglu_hidden
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32

# (registry name, options, test id). Small chunks so that T <= 20 crosses many boundaries.
CONFIGS = [
    ("mlp", dict(), "mlp"),
    ("mlp", dict(hidden=48, bias=True), "mlp-H48-bias"),
    ("swiglu", dict(), "swiglu"),
    ("moe", dict(num_experts=4, chunk_size=2), "moe-E4-k2-C2"),
    ("moe", dict(num_experts=8, topk=3, chunk_size=4, hidden=24), "moe-E8-k3-C4-H24"),
    ("moe", dict(num_experts=4, topk=1, chunk_size=3), "moe-E4-k1-C3"),
]
CONFIG_IDS = [c[2] for c in CONFIGS]


def build(name: str, options: dict, *, seed: int = 0):
    torch.manual_seed(seed)
    return build_ffn(name, D_MODEL, **options)


def moe(*, seed: int = 0, **options) -> ChunkMoE:
    return build("moe", options, seed=seed).double()


# ---------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_causal(name, options, _):
    check_causal(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_prefill_then_decode_equals_full_forward(name, options, _):
    check_prefill_decode(build(name, options))


@pytest.mark.parametrize(
    "prompt,chunk,decode",
    [(1, 2, 9), (4, 8, 5), (3, 5, 8)],
    ids=["P1-C2-D9", "P4-C8-D5-aligned", "P3-C5-D8"],
)
def test_moe_cache_across_chunk_boundaries(prompt, chunk, decode):
    """Calls that end on, just before and just after chunk boundaries (chunk_size 4)."""
    check_prefill_decode(
        moe(num_experts=4, chunk_size=4), prompt=prompt, chunk=chunk, decode=decode
    )


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_varlen_equals_each_sequence_alone(name, options, _):
    check_varlen(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_gradients_reach_every_parameter(name, options, _):
    check_gradients(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_state_size_and_cache(name, options, _):
    layer = build(name, options)
    if name == "moe":
        assert layer.state_size(1000) == 2 * D_MODEL
        assert layer.init_cache(3).chunk_sum.shape == (3, D_MODEL)
    else:
        assert layer.state_size(1000) == 0
        assert layer.init_cache(3) is None


# ---------------------------------------------------------------------------------------------
# MLP and SwiGLU against their formulas


def test_mlp_equals_formula():
    layer = build("mlp", dict(bias=True)).double()
    x = randn(2, 5, D_MODEL, seed=0, dtype=torch.float64)
    h = x @ layer.fc1.weight.T + layer.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    expected = h @ layer.fc2.weight.T + layer.fc2.bias
    assert layer.fc1.weight.shape == (4 * D_MODEL, D_MODEL)
    assert_close("mlp", expected, layer(x), 1e-14)


def test_swiglu_equals_formula():
    layer = build("swiglu", dict()).double()
    x = randn(2, 5, D_MODEL, seed=0, dtype=torch.float64)
    a, b = x @ layer.w1.weight.T, x @ layer.w3.weight.T
    expected = (a * torch.sigmoid(a) * b) @ layer.w2.weight.T
    assert_close("swiglu", expected, layer(x), 1e-14)


@pytest.mark.parametrize(
    "d_model,multiple_of,hidden", [(32, 16, 96), (768, 16, 2048), (100, 16, 272), (100, 1, 267)]
)
def test_swiglu_hidden_is_8_thirds_d_rounded_up(d_model, multiple_of, hidden):
    assert swiglu_hidden(d_model, multiple_of) == hidden
    assert SwiGLU(d_model, multiple_of=multiple_of).hidden == hidden


# ---------------------------------------------------------------------------------------------
# ChunkMoE routing


def reference_routing(layer: ChunkMoE, x: torch.Tensor):
    """Chunk by chunk: route chunk c from mean(x of chunk c - 1), chunk 0 from the learned input;
    every token of the chunk gets the chunk's experts and renormalised weights."""
    B, T, _ = x.shape
    C, k = layer.chunk_size, layer.topk
    experts = torch.empty(B, T, k, dtype=torch.long)
    weights = torch.empty(B, T, k, dtype=x.dtype)
    for b in range(B):
        for start in range(0, T, C):
            if start == 0:
                r = layer.first_chunk_input
            else:
                r = x[b, start - C : start].mean(0)
            p = torch.softmax(layer.router.weight @ r, -1)
            top = torch.argsort(p, descending=True)[:k]
            experts[b, start : start + C] = top
            weights[b, start : start + C] = p[top] / p[top].sum()
    return experts, weights


def reference_output(layer: ChunkMoE, x, experts, weights):
    """sum_j w_j * SwiGLU_{e_j}(x_t), token by token, from the stacked expert weights."""
    out = torch.zeros_like(x)
    for b, t in torch.cartesian_prod(torch.arange(x.shape[0]), torch.arange(x.shape[1])):
        for e, w in zip(experts[b, t], weights[b, t], strict=True):
            h = F.silu(x[b, t] @ layer.w1[e]) * (x[b, t] @ layer.w3[e])
            out[b, t] += w * (h @ layer.w2[e])
    return out


@pytest.mark.parametrize(
    "batch,seq_len,chunk_size",
    [(2, 19, 4), (1, 16, 16), (3, 7, 1), (1, 1, 4), (2, 1, 3)],
    ids=["B2-T19-C4", "B1-T16-C16", "B3-T7-C1", "B1-T1-C4-gathered", "B2-T1-C3-gathered"],
)
def test_moe_equals_chunk_by_chunk_reference(batch, seq_len, chunk_size):
    """Routing and output match the formulas; B * T * topk < E runs the gathered-expert path."""
    layer = moe(num_experts=8, chunk_size=chunk_size)
    x = randn(batch, seq_len, D_MODEL, seed=5, dtype=torch.float64)
    experts, weights = reference_routing(layer, x)
    with torch.no_grad():
        routing = layer.route(x)
        y = layer(x)
    assert torch.equal(routing.experts, experts)
    assert_close("routing weights", weights, routing.weights, 1e-13)
    assert_close("output", reference_output(layer, x, experts, weights), y, 1e-12)


@pytest.mark.parametrize(
    "num_experts,topk", [(16, 2), (16, 1), (3, 3)], ids=["E16-k2", "E16-k1", "E3-k3"]
)
def test_moe_grouped_cpu_path_equals_dense(num_experts, topk):
    """The CPU path (each expert on the tokens that picked it, some experts on none) against
    every expert on every token: output and every gradient."""
    layer = moe(num_experts=num_experts, topk=topk, chunk_size=4).double()
    x = randn(3, 21, D_MODEL, seed=9, dtype=torch.float64)
    routing = layer.route(x)
    results = {}
    for path in ("_experts_grouped", "_experts_dense"):
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_()
        y = getattr(layer, path)(x_leaf, routing.experts, routing.weights.detach())
        (y * randn(*y.shape, seed=4, dtype=torch.float64)).sum().backward()
        grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
        results[path] = (y, x_leaf.grad, grads)
    (y_g, dx_g, grads_g), (y_d, dx_d, grads_d) = results.values()
    assert_close("output", y_d, y_g, 1e-13)
    assert_close("dx", dx_d, dx_g, 1e-13)
    assert set(grads_g) == set(grads_d) == {"w1", "w2", "w3"}
    for name, grad in grads_d.items():
        assert_close(f"d{name}", grad, grads_g[name], 1e-13)


def test_moe_compiles_without_graph_breaks_on_cpu():
    """Under torch.compile the CPU path keeps the dense experts: no host read breaks the graph."""
    layer = moe(num_experts=4, chunk_size=4)
    x = randn(2, 12, D_MODEL, seed=3, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert_close("output", layer(x), compiled(x), 1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3], ids=["chunk1", "chunk2", "chunk3"])
def test_moe_chunk_is_routed_before_its_tokens(chunk):
    """Changing chunk i and everything after it changes neither the routing of chunks <= i nor
    the outputs of chunks < i; changing chunk i - 1 does change chunk i's routing weights."""
    layer = moe(num_experts=8, chunk_size=4)
    x = randn(2, 18, D_MODEL, seed=6, dtype=torch.float64)
    start = 4 * chunk
    changed = x.clone()
    changed[:, start:] += randn(2, 18 - start, D_MODEL, seed=7, dtype=torch.float64)
    with torch.no_grad():
        before, after = layer.route(x), layer.route(changed)
        y, y_changed = layer(x), layer(changed)
    routed = slice(0, start + 4)
    assert torch.equal(before.experts[:, routed], after.experts[:, routed])
    assert_close(
        "weights of chunks <= i", before.weights[:, routed], after.weights[:, routed], 1e-15
    )
    assert_close("outputs of chunks < i", y[:, :start], y_changed[:, :start], 1e-14)

    previous = x.clone()
    previous[:, start - 4 : start] += 1.0
    with torch.no_grad():
        moved = layer.route(previous)
    assert not torch.allclose(
        moved.weights[:, start : start + 4], before.weights[:, start : start + 4]
    )


def test_moe_token_output_ignores_the_rest_of_its_chunk():
    """With its chunk's routing fixed in advance, a token's output depends on itself alone."""
    layer = moe(num_experts=8, chunk_size=4)
    x = randn(1, 12, D_MODEL, seed=8, dtype=torch.float64)
    for t in range(4, 8):
        changed = x.clone()
        others = [s for s in range(4, 12) if s != t]
        changed[:, others] += randn(1, len(others), D_MODEL, seed=9 + t, dtype=torch.float64)
        with torch.no_grad():
            assert_close(f"token {t}", layer(x)[:, t], layer(changed)[:, t], 1e-14)


def test_moe_varlen_restarts_chunks_at_each_sequence():
    """Packed sequences of lengths not divisible by the chunk size route like separate ones."""
    layer = moe(num_experts=4, topk=2, chunk_size=3)
    lengths = (7, 2, 9)
    seqs = [randn(1, n, D_MODEL, seed=20 + i, dtype=torch.float64) for i, n in enumerate(lengths)]
    with torch.no_grad():
        packed = layer.route(torch.cat(seqs, 1), cu_seqlens=cu_seqlens_from_lengths(lengths))
        alone = [layer.route(s) for s in seqs]
    assert torch.equal(packed.experts, torch.cat([r.experts for r in alone], 1))
    assert_close("weights", torch.cat([r.weights for r in alone], 1), packed.weights, 1e-14)


@pytest.mark.parametrize("packed", [False, True], ids=["B2-T14", "varlen-5-9"])
def test_moe_never_reads_data_on_the_host(packed):
    """Forward and backward run on meta tensors, which hold no data: routing needs no host sync
    (no .item(), nonzero or tolist), not even to read cu_seqlens."""
    # .to("meta") and explicit devices, not a torch.device("meta") context: an earlier
    # torch.compile in the same process stops that context from reaching constructors.
    layer = ChunkMoE(D_MODEL, chunk_size=4).to("meta")
    x = torch.randn(1 if packed else 2, 14, D_MODEL, device="meta", requires_grad=True)
    cu = torch.tensor([0, 5, 14], dtype=torch.int32, device="meta") if packed else None
    y = layer(x, cu_seqlens=cu)
    (y.sum() + layer.aux_loss).backward()
    assert y.shape == x.shape and layer.w1.grad.shape == layer.w1.shape


# ---------------------------------------------------------------------------------------------
# Load-balancing loss


def test_aux_loss_hand_computed():
    """E = d = 4, router = identity, chunk_size 2: the router logits are the chunk means."""
    layer = ChunkMoE(4, num_experts=4, topk=2, chunk_size=2, hidden=8).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        layer.first_chunk_input.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0]))
    # chunk means: [0, 0, 3, 1] and [0, 1, 0, 2]; the third chunk's mean routes nothing.
    x = torch.tensor(
        [[[0, 0, 4, 1], [0, 0, 2, 1], [0, 2, 0, 1], [0, 0, 0, 3], [9, 0, 0, 0], [0, 9, 0, 0]]],
        dtype=torch.float64,
    )
    logits = torch.tensor([[2.0, 1, 0, 0], [0, 0, 3, 1], [0, 1, 0, 2]], dtype=torch.float64)
    # top-2 per chunk: {0, 1}, {2, 3}, {3, 1} -> slots per expert 1, 2, 1, 2 of 6
    fraction = torch.tensor([1, 2, 1, 2], dtype=torch.float64) / 6
    mean_prob = logits.softmax(-1).mean(0)
    layer.eval()
    with torch.no_grad():
        layer(x)
    expected = 4 * (fraction * mean_prob).sum()
    assert_close("aux_loss", expected, layer.aux_loss, 1e-14)
    assert layer.route(x).experts[0, ::2].sort(-1).values.tolist() == [[0, 1], [2, 3], [1, 3]]


def test_aux_loss_is_one_for_a_uniform_router():
    """P_e = 1/E for every e, so E * sum_e f_e P_e = sum_e f_e = 1 whatever the picks."""
    layer = moe(num_experts=8, chunk_size=3)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer(randn(2, 11, D_MODEL, seed=0, dtype=torch.float64))
    assert_close("aux_loss", torch.tensor(1.0, dtype=torch.float64), layer.aux_loss, 1e-15)


def test_aux_loss_counts_packed_chunks_only():
    """With cu_seqlens the slot bound exceeds the chunk count; empty slots must not count."""
    layer = moe(num_experts=4, chunk_size=4)
    lengths = (5, 3, 6)
    seqs = [randn(1, n, D_MODEL, seed=30 + i, dtype=torch.float64) for i, n in enumerate(lengths)]
    with torch.no_grad():
        layer(torch.cat(seqs, 1), cu_seqlens=cu_seqlens_from_lengths(lengths))
        packed = layer.aux_loss
        routes = [layer.route(s) for s in seqs]
    probs, picked = [], []
    for s, r in zip(seqs, routes, strict=True):
        for start in range(0, s.shape[1], 4):
            inp = layer.first_chunk_input if start == 0 else s[0, start - 4 : start].mean(0)
            probs.append(torch.softmax(layer.router.weight @ inp, -1))
            picked.append(F.one_hot(r.experts[0, start], 4).sum(0).double())
    fraction = torch.stack(picked).mean(0) / 2
    expected = 4 * (fraction * torch.stack(probs).mean(0)).sum()
    assert_close("aux_loss", expected, packed, 1e-14)


def test_aux_loss_is_differentiable():
    layer = moe(num_experts=4, chunk_size=2)
    layer(randn(2, 10, D_MODEL, seed=0, dtype=torch.float64))
    layer.aux_loss.backward()
    for p in (layer.router.weight, layer.first_chunk_input):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_aux_loss_set_in_eval_mode():
    layer = moe().eval()
    assert layer.aux_loss is None
    with torch.no_grad():
        layer(randn(1, 20, D_MODEL, seed=0, dtype=torch.float64))
    assert layer.aux_loss is not None and layer.aux_loss.dim() == 0


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("moe", dict(topk=9, num_experts=8), "topk=9 must be <= num_experts=8"),
        ("moe", dict(chunk_size=0), "chunk_size must be an int >= 1"),
        ("moe", dict(num_experts=0), "num_experts must be an int >= 1"),
        ("moe", dict(hidden=True), "hidden must be an int >= 1"),
        ("moe", dict(k=2), "unknown option(s) k; valid options: chunk_size, hidden"),
        ("swiglu", dict(multiple_of=0), "multiple_of must be an int >= 1"),
        ("mlp", dict(hidden=0), "hidden must be an int >= 1"),
        ("gelu", dict(), "unknown FFN 'gelu'; valid FFNs: mlp, moe, swiglu"),
    ],
    ids=["topk>E", "chunk0", "E0", "hidden-bool", "unknown-option", "multiple0", "hidden0", "name"],
)
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_ffn(name, D_MODEL, **options)


def test_bad_inputs_raise():
    layer = build("moe", dict())
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.zeros(1, 4, D_MODEL + 1))
    with pytest.raises(ValueError, match="cannot be combined"):
        layer(
            torch.zeros(1, 4, D_MODEL), cache=layer.init_cache(1), cu_seqlens=torch.tensor([0, 4])
        )


def test_registry():
    assert FFNS == {"mlp": MLP, "swiglu": SwiGLU, "moe": ChunkMoE}
    assert all(cls.name == name for name, cls in FFNS.items())
