"""The `attn` and `swa` mixers: the mixer contract, a hand-written reference, cache
continuation in any order, state size, options and errors."""

from __future__ import annotations

import pytest
import torch

from memzoo.kernels import KVCache, SlidingWindowCache
from memzoo.kernels.testing import assert_close, cu_seqlens_from_lengths, randn
from memzoo.models.mixers import build_mixer, mixer_options
from memzoo.models.mixers.attention import Attention
from memzoo.models.mixers.sliding_window import SlidingWindowAttention
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)


def make(name: str, *, seed: int = 0, d_model: int = 32, **options):
    torch.manual_seed(seed)
    return build_mixer(name, d_model, **options)


# (mixer, options): MHA and GQA for both; for swa windows below the prompt of
# check_prefill_decode (7) and below its chunk (5), between the chunk and prompt + chunk,
# of one token, and above every sequence here.
LAYERS = [
    pytest.param("attn", {"num_heads": 4}, id="attn-d32-H4"),
    pytest.param("attn", {"num_heads": 4, "num_kv_heads": 2}, id="attn-d32-H4-Hkv2"),
    pytest.param("attn", {"num_heads": 2, "num_kv_heads": 1}, id="attn-d32-H2-Hkv1"),
    pytest.param("swa", {"num_heads": 4, "window": 4}, id="swa-d32-H4-w4"),
    pytest.param("swa", {"num_heads": 4, "num_kv_heads": 2, "window": 4}, id="swa-d32-H4-Hkv2-w4"),
    pytest.param("swa", {"num_heads": 4, "num_kv_heads": 2, "window": 6}, id="swa-d32-H4-Hkv2-w6"),
    pytest.param("swa", {"num_heads": 2, "window": 1}, id="swa-d32-H2-w1"),
    pytest.param(
        "swa", {"num_heads": 4, "num_kv_heads": 2, "window": 64}, id="swa-d32-H4-Hkv2-w64"
    ),
]


# --------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", LAYERS)
def test_causal(name, options):
    check_causal(make(name, **options))


@pytest.mark.parametrize("name, options", LAYERS)
def test_prefill_then_chunk_then_decode_equals_full(name, options):
    check_prefill_decode(make(name, **options))


@pytest.mark.parametrize("name, options", LAYERS)
def test_varlen_equals_each_sequence_alone(name, options):
    check_varlen(make(name, **options))


@pytest.mark.parametrize(
    "name, options", [*LAYERS, pytest.param("attn", {"bias": True}, id="attn-d32-bias")]
)
def test_gradients(name, options):
    check_gradients(make(name, **options))


def rope_positions(layer, run) -> list[list[int]]:
    """The positions each call of `run()` hands to the layer's RoPE (once for q, once for k)."""
    seen = []
    hook = layer.rotary.register_forward_hook(lambda _, args, out: seen.append(args[1].tolist()))
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    return seen[::2]


@pytest.mark.parametrize("name", ["attn", "swa"])
def test_rope_positions_restart_per_sequence_and_continue_in_cache(name):
    """RoPE scores depend only on i - j, so outputs cannot show a wrong position offset per
    sequence: the positions themselves are checked."""
    layer = make(name, num_heads=4, window=2) if name == "swa" else make(name, num_heads=4)
    cu = cu_seqlens_from_lengths([3, 1, 4])
    packed = rope_positions(layer, lambda: layer(randn(1, 8, 32, seed=12), cu_seqlens=cu))
    assert packed == [[0, 1, 2, 0, 0, 1, 2, 3]]

    cache = layer.init_cache(2, max_seq_len=10)
    x = randn(2, 10, 32, seed=13)
    pieces = rope_positions(
        layer, lambda: [layer(x[:, a:b], cache=cache) for a, b in ((0, 3), (3, 4), (4, 7))]
    )
    assert pieces == [[0, 1, 2], [3], [4, 5, 6]]


# --------------------------------------------------------------------------------------
# Against a hand-written reference
# --------------------------------------------------------------------------------------


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """GPT-NeoX rotate-half RoPE on x `[B, T, H, D]`, token t at position t."""
    T, D = x.shape[1], x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # [T, D/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_forward(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The layer written out: its own weights, RoPE, and a softmax per query and head."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w = layer.qkv.weight
    q = (x @ w[: H * D].T).view(B, T, H, D)
    k = (x @ w[H * D : (H + Hkv) * D].T).view(B, T, Hkv, D)
    v = (x @ w[(H + Hkv) * D :].T).view(B, T, Hkv, D)
    q, k = rope(q, base=10000.0), rope(k, base=10000.0)
    window = T if layer.window is None else layer.window
    o = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        kv = h // (H // Hkv)
        for i in range(T):
            seen = range(max(0, i - window + 1), i + 1)
            scores = torch.stack([(q[:, i, h] * k[:, j, kv]).sum(-1) for j in seen], -1)
            p = (scores / D**0.5).softmax(dim=-1)  # [B, len(seen)]
            o[:, i, h] = sum(p[:, n, None] * v[:, j, kv] for n, j in enumerate(seen))
    return o.reshape(B, T, H * D) @ layer.out_proj.weight.T


@pytest.mark.parametrize(
    "name, options",
    [
        pytest.param("attn", {"num_heads": 4, "num_kv_heads": 2}, id="attn-d32-H4-Hkv2"),
        pytest.param(
            "swa", {"num_heads": 4, "num_kv_heads": 2, "window": 3}, id="swa-d32-H4-Hkv2-w3"
        ),
    ],
)
def test_equals_hand_written_reference(name, options):
    layer = make(name, **options).double()
    x = randn(2, 11, 32, seed=5, dtype=torch.float64)
    with torch.no_grad():
        assert_close("layer vs reference", reference_forward(layer, x), layer(x), 1e-12)


# --------------------------------------------------------------------------------------
# Inference cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options", LAYERS)
@pytest.mark.parametrize(
    "dtype, ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
def test_cache_any_order_of_chunks_and_tokens(name, options, dtype, ratio):
    """Tokens, then chunks after decoded tokens, in pieces of 3, 1, 1, 6, 1, 2, 5, 1."""
    layer = make(name, **options).to(dtype).eval()
    x = randn(2, 20, 32, seed=6, dtype=dtype)
    cache = layer.init_cache(2, dtype=dtype, max_seq_len=20)
    pieces, start = [], 0
    with torch.no_grad():
        full = layer(x)
        for size in (3, 1, 1, 6, 1, 2, 5, 1):
            pieces.append(layer(x[:, start : start + size], cache=cache))
            start += size
    assert int(cache.longest) == 20 and cache.lengths.tolist() == [20, 20]
    assert_close("pieces vs full", full, torch.cat(pieces, dim=1), ratio)


def test_cache_types_and_placement():
    attn, swa = make("attn", num_heads=4, num_kv_heads=2), make("swa", num_heads=4, window=8)
    cache = attn.init_cache(3, max_seq_len=50)
    assert isinstance(cache, KVCache) and tuple(cache.k.shape) == (3, 50, 2, 8)
    assert cache.k.dtype == torch.float32
    ring = swa.init_cache(3, dtype=torch.float64)
    assert isinstance(ring, SlidingWindowCache) and tuple(ring.k.shape) == (3, 8, 4, 8)
    assert ring.k.dtype == torch.float64


# --------------------------------------------------------------------------------------
# State size
# --------------------------------------------------------------------------------------


def test_state_size_formula():
    attn = make("attn", d_model=64, num_heads=4, num_kv_heads=2)  # head_dim 16
    swa = make("swa", d_model=64, num_heads=4, num_kv_heads=2, window=8)
    assert [attn.state_size(n) for n in (1, 8, 100)] == [64, 512, 6400]
    assert [swa.state_size(n) for n in (1, 8, 100)] == [64, 512, 512]


@pytest.mark.parametrize("name, options", LAYERS)
def test_state_size_counts_the_cache(name, options):
    """A cache filled with 30 tokens holds state_size(30) floats per sequence."""
    layer = make(name, **options)
    cache = layer.init_cache(2, max_seq_len=30)
    with torch.no_grad():
        layer(randn(2, 30, 32, seed=7), cache=cache)
    held = min(cache.k.shape[1], int(cache.longest))
    per_sequence = 2 * held * cache.k.shape[2] * cache.k.shape[3]
    assert per_sequence == layer.state_size(30)


# --------------------------------------------------------------------------------------
# Options, registry and errors
# --------------------------------------------------------------------------------------


def test_build_mixer_and_defaults():
    layer = build_mixer("attn", 64, num_heads=4)
    assert isinstance(layer, Attention) and layer.name == "attn"
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.window) == (4, 4, 16, None)
    assert tuple(layer.qkv.weight.shape) == (3 * 64, 64) and layer.qkv.bias is None
    assert tuple(layer.out_proj.weight.shape) == (64, 64)

    swa = build_mixer("swa", 64, layer_idx=3, num_heads=4, num_kv_heads=1)
    assert isinstance(swa, SlidingWindowAttention) and swa.name == "swa"
    assert (swa.window, swa.layer_idx, tuple(swa.qkv.weight.shape)) == (512, 3, (6 * 16, 64))

    assert (Attention(256).num_heads, Attention(256).head_dim) == (4, 64)
    assert (Attention(32).num_heads, Attention(32).head_dim) == (1, 32)
    assert set(mixer_options("swa")) == set(mixer_options("attn")) | {"window"}


def test_explicit_head_dim_when_d_model_is_not_divisible():
    layer = Attention(30, num_heads=4, head_dim=8)
    assert layer(randn(2, 5, 30, seed=8)).shape == (2, 5, 30)


@pytest.mark.parametrize(
    "build, match",
    [
        pytest.param(
            lambda: Attention(32, num_heads=4, num_kv_heads=3), "num_kv_heads", id="kv-3-of-4"
        ),
        pytest.param(lambda: Attention(32, num_heads=0), "num_heads", id="heads-0"),
        pytest.param(lambda: Attention(30, num_heads=4), "d_model=30", id="d30-H4"),
        pytest.param(lambda: Attention(30, num_heads=2), "head_dim", id="odd-head-dim"),
        pytest.param(lambda: Attention(32, rope_base=0.0), "rope_base", id="rope-base-0"),
        pytest.param(lambda: SlidingWindowAttention(32, window=0), "window", id="window-0"),
        pytest.param(lambda: SlidingWindowAttention(32, window=2.5), "window", id="window-float"),
        pytest.param(lambda: build_mixer("attn", 32, window=4), "unknown option", id="attn-window"),
    ],
)
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_attn_cache_needs_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        make("attn").init_cache(2)


@pytest.mark.parametrize("name", ["attn", "swa"])
@pytest.mark.parametrize("shape", [(2, 5, 31), (2, 5), (2, 5, 32, 1)], ids=["d31", "2d", "4d"])
def test_wrong_shaped_x_raises(name, shape):
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=32\]"):
        make(name)(torch.zeros(shape))


def test_wrong_cache_raises():
    attn, swa = make("attn", num_heads=4), make("swa", num_heads=4, window=4)
    x = randn(2, 3, 32, seed=9)
    with pytest.raises(TypeError, match="KVCache"):
        attn(x, cache=swa.init_cache(2))
    with pytest.raises(TypeError, match="SlidingWindowCache"):
        swa(x, cache=attn.init_cache(2, max_seq_len=8))
    with pytest.raises(ValueError, match="window"):
        swa(x, cache=make("swa", num_heads=4, window=8).init_cache(2))


def test_chunk_past_max_seq_len_raises():
    layer = make("attn", num_heads=4)
    cache = layer.init_cache(2, max_seq_len=8)
    with torch.no_grad():
        layer(randn(2, 5, 32, seed=10), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len=8"):
            layer(randn(2, 4, 32, seed=11), cache=cache)
