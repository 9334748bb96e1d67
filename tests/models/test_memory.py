"""The memory sub-blocks (`workspace`, `pkm`): the mixer contract, a chunk-by-chunk workspace
reference, the workspace's chunk causality, and product-key search against brute force."""

from __future__ import annotations

import math
import re

import pytest
import torch

from memzoo.kernels.testing import assert_close, randn
from memzoo.models.memory import (
    MEMORIES,
    ProductKeyMemory,
    WorkspaceMemory,
    build_memory,
    product_key_topk,
)
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32

# (registry name, options, test id). Small chunks so that T <= 20 crosses many boundaries.
CONFIGS = [
    ("workspace", dict(chunk_size=4), "workspace-S8-H1-C4"),
    ("workspace", dict(num_slots=5, num_heads=4, chunk_size=3), "workspace-S5-H4-C3"),
    ("workspace", dict(), "workspace-defaults-C32"),
    ("pkm", dict(), "pkm-n32-k8-H1"),
    ("pkm", dict(num_keys=8, topk=4, key_dim=12, num_heads=2), "pkm-n8-k4-K12-H2"),
]
CONFIG_IDS = [c[2] for c in CONFIGS]


def build(name: str, options: dict, *, seed: int = 0):
    torch.manual_seed(seed)
    return build_memory(name, D_MODEL, **options)


def workspace(**options) -> WorkspaceMemory:
    return build("workspace", options).double().eval()


# ---------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_causal(name, options, _):
    check_causal(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_prefill_then_decode_equals_full_forward(name, options, _):
    """The prompt (7 tokens) ends inside a chunk for every chunk size here."""
    check_prefill_decode(build(name, options))


@pytest.mark.parametrize(
    "prompt,chunk,decode",
    [(1, 2, 9), (4, 8, 5), (5, 6, 6)],
    ids=["P1-C2-D9", "P4-C8-D5-aligned", "P5-C6-D6"],
)
def test_workspace_cache_across_chunk_boundaries(prompt, chunk, decode):
    """Calls that end on, just before and just after chunk boundaries (chunk_size 4)."""
    check_prefill_decode(workspace(chunk_size=4), prompt=prompt, chunk=chunk, decode=decode)


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_varlen_equals_each_sequence_alone(name, options, _):
    check_varlen(build(name, options))


# 16 tokens never finish a 32-token chunk: the default workspace would never write.
GRADIENT_CONFIGS = [c for c in CONFIGS if c[2] != "workspace-defaults-C32"]


@pytest.mark.parametrize("name,options,_", GRADIENT_CONFIGS, ids=[c[2] for c in GRADIENT_CONFIGS])
def test_gradients_reach_every_parameter(name, options, _):
    """16 tokens cross chunk boundaries, so the write parameters reach later reads."""
    check_gradients(build(name, options))


def test_state_size_and_cache():
    layer = workspace(num_slots=5, num_heads=2, chunk_size=4)
    assert layer.state_size(1000) == (5 + 2 * 3) * D_MODEL
    cache = layer.init_cache(2)
    assert cache.slots.shape == (2, 5, D_MODEL) and cache.keys.shape == (2, 0, 2, 16)
    with torch.no_grad():
        layer(randn(2, 7, D_MODEL, seed=0, dtype=torch.float64), cache=cache)
    assert cache.keys.shape == (2, 3, 2, 16) and cache.values.shape == (2, 3, 2, 16)
    pkm = build("pkm", dict())
    assert pkm.state_size(1000) == 0 and pkm.init_cache(2) is None


# ---------------------------------------------------------------------------------------------
# WorkspaceMemory against a chunk-by-chunk reference


def _mha(q, k, v, heads: int):
    """Softmax attention of q `[n, d]` over k, v `[m, d]`, per head, scaled by 1/sqrt(d/heads)."""
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    a = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("hnm,mhd->nhd", a, v).flatten(-2)


def reference_workspace(layer: WorkspaceMemory, x: torch.Tensor) -> torch.Tensor:
    """Read M_i in chunk i, then M_{i+1} = M_i + sigmoid(W_g U_i + b_g) U_i if chunk i is full."""
    C, H = layer.chunk_size, layer.num_heads
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        M = layer.slots
        for start in range(0, x.shape[1], C):
            X = x[b, start : start + C]
            read = _mha(layer.q_proj(X), layer.k_proj(M), layer.v_proj(M), H)
            out[b, start : start + C] = layer.out_proj(read)
            if X.shape[0] == C:
                U = _mha(layer.write_q(M), layer.write_k(X), layer.write_v(X), H)
                M = M + torch.sigmoid(layer.write_gate(U)) * U
    return out


@pytest.mark.parametrize(
    "batch,seq_len,chunk_size,num_heads",
    [(2, 19, 4, 2), (1, 16, 8, 1), (1, 5, 1, 4), (2, 3, 32, 1)],
    ids=["B2-T19-C4-H2", "B1-T16-C8-H1", "B1-T5-C1-H4", "B2-T3-C32-H1"],
)
def test_workspace_equals_chunk_by_chunk_reference(batch, seq_len, chunk_size, num_heads):
    layer = workspace(num_slots=5, num_heads=num_heads, chunk_size=chunk_size)
    x = randn(batch, seq_len, D_MODEL, seed=1, dtype=torch.float64)
    with torch.no_grad():
        assert_close("workspace", reference_workspace(layer, x), layer(x), 1e-13)


@pytest.mark.parametrize("chunk", [1, 2, 3], ids=["chunk1", "chunk2", "chunk3"])
def test_workspace_chunk_causality(chunk):
    """Changing chunk i and later changes no output of chunks < i, and changes chunk i + 1's."""
    layer = workspace(chunk_size=4)
    x = randn(2, 20, D_MODEL, seed=2, dtype=torch.float64)
    start = 4 * chunk
    changed = x.clone()
    changed[:, start : start + 4] += randn(2, 4, D_MODEL, seed=3, dtype=torch.float64)
    with torch.no_grad():
        y, y_changed = layer(x), layer(changed)
    assert_close("outputs of chunks < i", y[:, :start], y_changed[:, :start], 1e-14)
    assert not torch.allclose(y[:, start + 4 :], y_changed[:, start + 4 :]), "write ignored"


def test_workspace_token_ignores_the_rest_of_its_chunk():
    """A token reads slots written by earlier chunks only: the other tokens of its own chunk
    (and all later ones) never change its output."""
    layer = workspace(chunk_size=4)
    x = randn(2, 14, D_MODEL, seed=4, dtype=torch.float64)
    for t in range(4, 8):
        changed = x.clone()
        others = [s for s in range(4, 14) if s != t]
        changed[:, others] += randn(2, len(others), D_MODEL, seed=5 + t, dtype=torch.float64)
        with torch.no_grad():
            assert_close(f"token {t}", layer(x)[:, t], layer(changed)[:, t], 1e-14)


@pytest.mark.parametrize(
    "name,options", [("workspace", dict(chunk_size=4)), ("pkm", dict())], ids=["workspace", "pkm"]
)
def test_never_reads_data_on_the_host(name, options):
    """Forward and backward (and a cached continuation) run on meta tensors, which hold no
    data: no host syncs. Only the workspace's varlen path reads cu_seqlens on the host."""
    # .to("meta") and explicit devices, not a torch.device("meta") context: an earlier
    # torch.compile in the same process stops that context from reaching constructors.
    layer = build_memory(name, D_MODEL, **options).to("meta")
    x = torch.randn(2, 14, D_MODEL, device="meta", requires_grad=True)
    layer(x).sum().backward()
    cache = layer.init_cache(2, device="meta", dtype=torch.float32)
    with torch.no_grad():
        layer(x[:, :7], cache=cache)
        assert layer(x[:, 7:8], cache=cache).shape == (2, 1, D_MODEL)


# ---------------------------------------------------------------------------------------------
# ProductKeyMemory against brute force over all num_keys^2 keys

PKM_CONFIGS = [
    dict(num_keys=32, topk=8, key_dim=16, num_heads=1),
    dict(num_keys=8, topk=8, key_dim=10, num_heads=3),
    dict(num_keys=16, topk=1, key_dim=4, num_heads=2),
    dict(num_keys=5, topk=3, key_dim=32, num_heads=1),
]
PKM_IDS = ["n32-k8-K16-H1", "n8-k8-K10-H3", "n16-k1-K4-H2", "n5-k3-K32-H1"]


def brute_force(layer: ProductKeyMemory, x: torch.Tensor):
    """Score every full key [c_i ; c'_j] (index i * n + j) and take the top-k directly."""
    H, K, n = layer.num_heads, layer.key_dim, layer.num_keys
    q = layer.query_norm(layer.query(x).unflatten(-1, (H, K)))
    left = layer.keys[:, 0, :, None].expand(H, n, n, K // 2)
    right = layer.keys[:, 1, None, :].expand(H, n, n, K // 2)
    full_keys = torch.cat([left, right], dim=-1).flatten(1, 2)  # [H, n^2, K]
    scores, indices = torch.einsum("bthk,hmk->bthm", q, full_keys).topk(layer.topk, dim=-1)
    memory = (scores.softmax(-1)[..., None] * layer.values.weight[indices]).sum((2, 3))
    return scores, indices, memory * torch.sigmoid(layer.gate(x))


@pytest.mark.parametrize("options", PKM_CONFIGS, ids=PKM_IDS)
def test_pkm_search_is_exact(options):
    """Product-key search finds the same top-k keys, scores and output as brute force."""
    layer = build("pkm", options).double()
    x = randn(2, 9, D_MODEL, seed=6, dtype=torch.float64)
    with torch.no_grad():
        scores, indices, expected = brute_force(layer, x)
        q = layer.query_norm(layer.query(x).unflatten(-1, (layer.num_heads, layer.key_dim)))
        found_scores, found = product_key_topk(q, layer.keys, layer.topk)
        y = layer(x)
    assert torch.equal(found, indices)
    assert_close("scores", scores, found_scores, 1e-14)
    assert_close("output", expected, y, 1e-13)


def test_pkm_gradients_reach_selected_values_only():
    layer = build("pkm", dict(num_keys=8, topk=2)).double()
    x = randn(1, 3, D_MODEL, seed=7, dtype=torch.float64)
    layer(x).square().sum().backward()
    with torch.no_grad():
        q = layer.query_norm(layer.query(x).unflatten(-1, (1, layer.key_dim)))
        selected = product_key_topk(q, layer.keys, layer.topk)[1].unique()
    touched = layer.values.weight.grad.abs().sum(-1).nonzero().flatten()
    assert torch.equal(touched, selected)
    for p in (layer.keys, layer.query.weight, layer.query_norm.weight, layer.gate.weight):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("workspace", dict(num_heads=3), "d_model=32 must be divisible by num_heads=3"),
        ("workspace", dict(chunk_size=0), "chunk_size must be an int >= 1"),
        ("workspace", dict(num_slots=0), "num_slots must be an int >= 1"),
        ("pkm", dict(topk=33), "topk=33 must be <= num_keys=32"),
        ("pkm", dict(key_dim=7), "key_dim must be even"),
        ("pkm", dict(num_heads=0), "num_heads must be an int >= 1"),
        ("pkm", dict(k=4), "unknown option(s) k; valid options: key_dim, num_heads"),
        ("hopfield", dict(), "unknown memory 'hopfield'; valid memories: pkm, workspace"),
    ],
    ids=["heads", "chunk0", "slots0", "topk>n", "odd-key-dim", "heads0", "option", "name"],
)
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_memory(name, D_MODEL, **options)


def test_bad_inputs_raise():
    layer = build("workspace", dict(chunk_size=4))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="B == 1"):
        layer(torch.zeros(2, 4, D_MODEL), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))


def test_registry():
    assert MEMORIES == {"workspace": WorkspaceMemory, "pkm": ProductKeyMemory}
    assert all(cls.name == name for name, cls in MEMORIES.items())
