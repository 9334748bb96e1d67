"""The mom mixer (Mixture-of-Memories): the mixer contract, the math against an fp64 loop over
memories and tokens built from the layer's own weights, the load-balancing loss on a
hand-computed case, decode touching only the routed memories, and a forward free of host syncs
(torch.compile with fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.testing import assert_close, randn
from memzoo.models.mixers import build_mixer, mixer_options
from memzoo.models.mixers.mom import MixtureOfMemories
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32
# id -> options. Ids say the memories (M), top-k (k), shared memory (S) and heads (H).
OPTIONS = {
    "M4-k2-S-H4": {},
    "M3-k1-H2-conv3": {
        "num_memories": 3, "topk": 1, "shared_memory": False, "num_heads": 2, "conv_size": 3,
    },
    "M1-k1-H4-single-memory": {"num_memories": 1, "topk": 1, "shared_memory": False},
    "M5-k3-S-H2-expand_k1": {"num_memories": 5, "topk": 3, "num_heads": 2, "expand_k": 1.0},
}  # fmt: skip


def build(key: str, seed: int = 0) -> MixtureOfMemories:
    torch.manual_seed(seed)
    return build_mixer("mom", D_MODEL, **OPTIONS[key])


# --------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", OPTIONS)
def test_causal(key):
    check_causal(build(key))


@pytest.mark.parametrize("key", OPTIONS)
def test_prefill_then_decode_equals_full(key):
    check_prefill_decode(build(key))


@pytest.mark.parametrize("key", OPTIONS)
def test_varlen_equals_per_sequence(key):
    check_varlen(build(key))


@pytest.mark.parametrize("key", ["M4-k2-S-H4", "M3-k1-H2-conv3"])
def test_gradients_reach_every_parameter(key):
    check_gradients(build(key))


@pytest.mark.parametrize("key", OPTIONS)
def test_state_size_counts_the_cache(key):
    mixer = build(key)
    cache = mixer.init_cache(3)
    floats = cache.state.numel() + sum(c.numel() for c in cache.conv)
    assert mixer.state_size(10) == mixer.state_size(10_000) == floats // 3
    H, dk, dv = mixer.num_heads, mixer.key_dim, mixer.value_dim
    memories = mixer.num_memories + mixer.shared_memory
    assert cache.state.shape == (3, memories, H, dk, dv)


def test_registry_defaults_follow_the_paper():
    options = mixer_options("mom")
    assert options["num_memories"] == 4 and options["topk"] == 2
    assert options["shared_memory"] is True
    mixer = build_mixer("mom", 64)
    assert (mixer.key_dim, mixer.value_dim) == (64 // 2 // 4, 64 // 4)
    assert mixer.k_weight.shape == (5, 64, 4 * mixer.key_dim)  # stacked: [M + shared, d, H dk]


@pytest.mark.parametrize(
    "options,match",
    [
        ({"topk": 5}, "topk must be at most 4"),
        ({"num_memories": 0}, "num_memories must be an int >= 1"),
        ({"num_heads": 3}, "must be divisible by num_heads=3"),
        ({"expand_k": 0.3}, "expand_k must be a positive number"),
        ({"conv_size": 9}, "conv_size must be at most 8"),
        ({"shared_memory": 1}, "shared_memory must be a bool"),
    ],
    ids=["topk", "num_memories", "num_heads", "expand_k", "conv_size", "shared_memory"],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        build_mixer("mom", D_MODEL, **options)


# --------------------------------------------------------------------------------------
# The math, against an fp64 loop over memories and tokens
# --------------------------------------------------------------------------------------


def _causal_conv_silu(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(sum_w weight[c, w] u[t - (W - 1) + w, c]) for u `[B, T, C]`, weight `[C, W]`."""
    T, W = u.shape[1], weight.shape[1]
    padded = F.pad(u, (0, 0, W - 1, 0))
    return F.silu(sum(padded[:, w : w + T] * weight[:, w] for w in range(W)))


def naive_forward(mixer: MixtureOfMemories, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's math from the layer's weights, memory by memory, token by token."""
    B, T, _ = x.shape
    M, topk, H = mixer.num_memories, mixer.topk, mixer.num_heads
    dk, dv = mixer.key_dim, mixer.value_dim
    memories = M + mixer.shared_memory
    probs = (x @ mixer.router.weight.T).softmax(-1)
    top_p, top_m = probs.topk(topk, dim=-1)
    top_w = top_p / top_p.sum(-1, keepdim=True)

    q = _causal_conv_silu(x @ mixer.q_proj.weight.T, mixer.q_conv.weight).view(B, T, H, dk)
    k_all = torch.cat([x @ mixer.k_weight[m] for m in range(memories)], dim=-1)
    v_all = torch.cat([x @ mixer.v_weight[m] for m in range(memories)], dim=-1)
    k_all = _causal_conv_silu(k_all, mixer.k_conv.weight).view(B, T, memories, H, dk)
    v_all = _causal_conv_silu(v_all, mixer.v_conv.weight).view(B, T, memories, H, dv)

    reads = [[[] for _ in range(T)] for _ in range(B)]
    for m in range(memories):
        g = F.logsigmoid(x @ mixer.g_weight[m] + mixer.g_bias[m]) / mixer.gate_logit_normalizer
        for b in range(B):
            S = x.new_zeros(H, dk, dv)
            for t in range(T):
                if m == M:
                    weight = 1.0  # the shared memory sees every token
                elif m in top_m[b, t].tolist():
                    weight = top_w[b, t, top_m[b, t].tolist().index(m)]
                else:
                    continue
                k, v = k_all[b, t, m], v_all[b, t, m]
                S = g[b, t].exp()[:, None, None] * S + k[:, :, None] * v[:, None, :]
                reads[b][t].append(weight * dk**-0.5 * (q[b, t][:, :, None] * S).sum(1))
    o = torch.stack([torch.stack([sum(r) for r in row]) for row in reads])  # [B, T, H, dv]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
    gate = F.silu(x @ mixer.gate_proj.weight.T).view(B, T, H, dv)
    return (o * gate).flatten(2) @ mixer.out_proj.weight.T


@pytest.mark.parametrize("key", ["M4-k2-S-H4", "M3-k1-H2-conv3"])
def test_forward_and_gradients_equal_the_naive_loop(key):
    mixer = build(key).double()
    # Biases and norm weights away from their init, so their gradients are checked too.
    with torch.no_grad():
        mixer.g_bias.copy_(randn(*mixer.g_bias.shape, seed=5, dtype=torch.float64))
        mixer.norm.weight.add_(randn(mixer.value_dim, seed=6, dtype=torch.float64) * 0.3)
    x = randn(2, 9, D_MODEL, seed=7, dtype=torch.float64)
    cotangent = randn(2, 9, D_MODEL, seed=8, dtype=torch.float64)

    def run(forward):
        mixer.zero_grad()
        leaf = x.clone().requires_grad_()
        y = forward(leaf)
        (y * cotangent).sum().backward()
        return y, leaf.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}

    y, dx, grads = run(mixer)
    y_ref, dx_ref, grads_ref = run(lambda inp: naive_forward(mixer, inp))
    assert_close("y", y_ref, y, 1e-12)
    assert_close("dx", dx_ref, dx, 1e-10)
    for name, grad in grads_ref.items():
        if name == "router.weight" and mixer.topk == 1:
            # One pick renormalised is a weight of 1 whatever the logits: no gradient but the
            # aux loss's, and both sides hold only rounding noise.
            assert grad.abs().max() < 1e-15 and grads[name].abs().max() < 1e-15
            continue
        assert_close(f"d{name}", grad, grads[name], 1e-10)


def test_load_balancing_loss_on_a_hand_computed_case():
    torch.manual_seed(0)
    mixer = build_mixer("mom", 8, num_memories=4, topk=2, num_heads=2).double()
    with torch.no_grad():
        mixer.router.weight.zero_()
        mixer.router.weight[:, :4] = torch.eye(4)
    # The router logits are log-probabilities: token 1 p = (.4, .3, .2, .1) picks memories
    # {0, 1}; token 2 p = (.5, .1, .3, .1) picks {0, 2}.
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]], dtype=torch.float64)
    x = F.pad(p.log(), (0, 4))[None]
    mixer(x)
    # Picks: memory 0 twice, 1 and 2 once, 3 never -> f = (2, 1, 1, 0) / 4;
    # mean probabilities P = (.45, .2, .25, .1); loss = 4 * sum f * P = 1.35.
    assert math.isclose(mixer.aux_loss.item(), 1.35, rel_tol=1e-12)


def test_balanced_routing_gives_a_loss_of_one():
    mixer = build("M4-k2-S-H4").double()
    with torch.no_grad():
        mixer.router.weight.zero_()  # uniform probabilities; ties resolve to some 2 memories
    mixer(randn(1, 4, D_MODEL, seed=9, dtype=torch.float64))
    # P_m = 1/4 for every m, and sum_m f_m = 1, so the loss is 4 * 1/4 = 1 whatever the picks.
    assert math.isclose(mixer.aux_loss.item(), 1.0, rel_tol=1e-12)


# --------------------------------------------------------------------------------------
# Decode, and no host syncs
# --------------------------------------------------------------------------------------


def test_a_decoded_token_updates_only_its_memories():
    mixer = build("M4-k2-S-H4").double().eval()
    x = randn(3, 6, D_MODEL, seed=10, dtype=torch.float64)
    with torch.no_grad():
        cache = mixer.init_cache(3, dtype=torch.float64)
        mixer(x[:, :5], cache=cache)
        before = cache.state.clone()
        mixer(x[:, 5:], cache=cache)
        picks = mixer.router(x[:, 5]).topk(2, dim=-1).indices
    routed = torch.zeros(3, 5, dtype=torch.bool).scatter(1, picks, True)
    routed[:, 4] = True  # the shared memory
    assert torch.equal(cache.state[~routed], before[~routed])
    changed = (cache.state != before).flatten(2).any(-1)
    assert bool(changed[routed].all())


def test_forward_compiles_without_graph_breaks():
    mixer = build("M4-k2-S-H4").eval()
    x = randn(2, 12, D_MODEL, seed=11)
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = mixer(x)
        aux = mixer.aux_loss
        out = compiled(x)
    assert_close("y", expected, out, 1e-6)
    assert_close("aux_loss", aux, mixer.aux_loss, 1e-6)
