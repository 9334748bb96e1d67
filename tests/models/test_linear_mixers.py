"""The linear_attn, based, short_conv and jrt mixers: the mixer contract (causality, prefill +
decode, varlen, gradients, state size) and the math, against explicit fp64 forms built from each
layer's own weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.testing import assert_close, randn
from memzoo.models.mixers import build_mixer, mixer_options
from memzoo.models.mixers.based import Based
from memzoo.models.mixers.jrt import JRTLinearAttention
from memzoo.models.mixers.linear_attention import LinearAttention
from memzoo.models.mixers.short_conv import ShortConvMixer
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32
EPS = 1e-6  # the kernels' normaliser eps, which the layers keep
F64 = 1e-12
F32 = 5e-6

# id -> (registry name, options). Ids say the heads (H), raw q/k feature dim (F), map and flags.
LINEAR_ATTN = {
    "H4-F16-elu-norm": {},
    "H4-F16-elu-plain": {"normalize": False},
    "H2-F8-identity-plain": {
        "num_heads": 2, "feature_dim": 8, "feature_map": "identity", "normalize": False,
    },
    "H4-F8-relu-norm": {"feature_dim": 8, "feature_map": "relu"},
    "H4-F4-taylor-norm": {"feature_dim": 4, "feature_map": "taylor"},
    "H4-F4-taylor-plain": {"feature_dim": 4, "feature_map": "taylor", "normalize": False},
    "H4-F4-taylor_compressed-norm": {"feature_dim": 4, "feature_map": "taylor_compressed"},
    "H4-F16-elu-norm-gla": {"decay": "gla"},
    "H4-F16-elu-plain-gla": {"normalize": False, "decay": "gla"},
    "H4-F16-elu-norm-conv4": {"short_conv": True},
    "H2-F4-taylor-norm-gla-conv3": {
        "num_heads": 2, "feature_dim": 4, "feature_map": "taylor", "decay": "gla",
        "short_conv": True, "conv_size": 3,
    },
}  # fmt: skip
JRT = {
    "M4-H16-F16-taylor-norm": {"prefix_len": 4},
    "M6-H4-F4-taylor-plain": {
        "prefix_len": 6, "num_heads": 4, "feature_dim": 4, "normalize": False,
    },
    "M5-H4-F8-elu-norm-gla-conv4": {
        "prefix_len": 5, "num_heads": 4, "feature_dim": 8, "feature_map": "elu", "decay": "gla",
        "short_conv": True,
    },
}  # fmt: skip
MIXERS = {
    **{f"linear_attn-{k}": ("linear_attn", v) for k, v in LINEAR_ATTN.items()},
    "based-H16": ("based", {}),
    "based-H4": ("based", {"num_heads": 4}),
    "short_conv-W3-E1": ("short_conv", {}),
    "short_conv-W4-E2": ("short_conv", {"kernel_size": 4, "expand": 2}),
    **{f"jrt-{k}": ("jrt", v) for k, v in JRT.items()},
}


def build(key: str, seed: int = 0):
    name, options = MIXERS[key]
    torch.manual_seed(seed)
    return build_mixer(name, D_MODEL, **options)


# --------------------------------------------------------------------------------------
# The mixer contract
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [k for k in MIXERS if not k.startswith("jrt")])
def test_causal(key):
    check_causal(build(key))


@pytest.mark.parametrize("key", MIXERS)
def test_prefill_decode(key):
    # prompt 7 >= every jrt prefix_len here: the first chunk holds the whole prefix.
    check_prefill_decode(build(key), prompt=7)


@pytest.mark.parametrize("key", MIXERS)
def test_varlen(key):
    # Lengths 1 and 5 are shorter than some jrt prefixes: those read their whole sequence.
    check_varlen(build(key), lengths=(5, 1, 12, 8))


@pytest.mark.parametrize("key", MIXERS)
def test_gradients(key):
    check_gradients(build(key))


def _cache_floats(cache) -> int:
    """Floats one sequence holds in a cache: its share of every tensor field."""
    tensors = []
    for value in vars(cache).values():
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, tuple):
            tensors.extend(value)
    return sum(t[0].numel() for t in tensors)


# key -> the state_size formula worked out by hand for d_model = 32.
STATE_SIZES = {
    "linear_attn-H4-F16-elu-norm": 4 * 16 * 8 + 4 * 16,  # H K' V + H K'
    "linear_attn-H4-F16-elu-plain": 4 * 16 * 8,
    "linear_attn-H4-F4-taylor-norm": 4 * 21 * 8 + 4 * 21,  # K' = 1 + 4 + 16
    "linear_attn-H4-F4-taylor_compressed-norm": 4 * 15 * 8 + 4 * 15,  # K' = 1 + 4 + 10
    "linear_attn-H4-F16-elu-norm-conv4": 4 * 16 * 8 + 4 * 16 + 3 * (2 * 4 * 16 + 32),
    "linear_attn-H2-F4-taylor-norm-gla-conv3": 2 * 21 * 16 + 2 * 21 + 2 * (2 * 2 * 4 + 32),
    "based-H16": 16 * 273 * 2 + 16 * 273,
    "based-H4": 4 * 273 * 8 + 4 * 273,
    "short_conv-W3-E1": 2 * 32,
    "short_conv-W4-E2": 3 * 64,
    "jrt-M4-H16-F16-taylor-norm": 16 * 273 * 2 + 16 * 273,
    "jrt-M6-H4-F4-taylor-plain": 4 * 21 * 8,
    "jrt-M5-H4-F8-elu-norm-gla-conv4": 4 * 8 * 8 + 4 * 8 + 3 * (2 * 4 * 8 + 32),
}


@pytest.mark.parametrize("key", MIXERS)
def test_state_size_counts_the_cache(key):
    mixer = build(key)
    size = mixer.state_size(100)
    assert size == mixer.state_size(10_000), "a recurrent state does not grow with seq_len"
    assert size == _cache_floats(mixer.init_cache(3))
    if key in STATE_SIZES:
        assert size == STATE_SIZES[key]


# --------------------------------------------------------------------------------------
# Explicit fp64 forms from the layers' own weights
# --------------------------------------------------------------------------------------


def _heads(u: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, H * d] -> [B, H, T, d]."""
    B, T, _ = u.shape
    return u.view(B, T, H, -1).transpose(1, 2)


def _conv_silu(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(sum_w weight[d, w] u[t - (W - 1) + w, d]), zeros before the start; u [B, T, dim]."""
    W = weight.shape[1]
    y = torch.zeros_like(u)
    for w in range(W):
        lag = W - 1 - w
        y[:, lag:] += weight[:, w].double() * u[:, : u.shape[1] - lag]
    return F.silu(y)


def _kernel(q: torch.Tensor, k: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(q_t)·phi(k_s) `[B, H, T, S]` for q [B, H, T, d], k [B, H, S, d]."""
    if feature_map in ("taylor", "taylor_compressed"):  # closed form of their dot product
        d = q.shape[-1]
        s = q @ k.transpose(-1, -2)
        return 1 + s / math.sqrt(d) + s**2 / (2 * d)
    phi = {
        "identity": lambda u: u,
        "elu": lambda u: torch.where(u > 0, u + 1, u.exp()),
        "relu": lambda u: u.clamp(min=0),
    }[feature_map]
    return phi(q) @ phi(k).transpose(-1, -2)


def _attend(A, v, *, normalize, num_features, extra=None):
    """Rows of scores A [B, H, T, S] over v [B, H, S, V] (+ extra (A_e, v_e) of the prefix)."""
    o, denominator = A @ v, A.sum(-1, keepdim=True)
    if extra is not None:
        A_e, v_e = extra
        o, denominator = o + A_e @ v_e, denominator + A_e.sum(-1, keepdim=True)
    if normalize:
        return o / (denominator + EPS)
    return o * num_features**-0.5


def _linear_attention_explicit(mixer: LinearAttention, x: torch.Tensor, *, prefix=None):
    """The quadratic form of (gated) linear attention: masked decayed scores times v."""
    B, T, _ = x.shape
    H, name = mixer.num_heads, mixer.feature_map.name
    q, k, v = x @ mixer.q_proj.weight.T, x @ mixer.k_proj.weight.T, x @ mixer.v_proj.weight.T
    if mixer.short_conv:
        q, k, v = (
            _conv_silu(u, c.weight)
            for u, c in zip((q, k, v), (mixer.q_conv, mixer.k_conv, mixer.v_conv), strict=True)
        )
    q, k, v = _heads(q, H), _heads(k, H), _heads(v, H)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    A = _kernel(q, k, name).masked_fill(~mask, 0.0)
    if mixer.decay == "gla":
        g = F.logsigmoid(x @ mixer.g_proj.weight.T + mixer.g_proj.bias) / 16  # [B, T, H]
        b = g.transpose(1, 2).cumsum(-1)  # [B, H, T]
        gap = (b[..., :, None] - b[..., None, :]).masked_fill(~mask, 0.0)
        A = A * gap.exp()
        if prefix is not None:  # the encoder state decays from before token 0
            prefix = (prefix[0] * b.exp()[..., None], prefix[1])
    o = _attend(A, v, normalize=mixer.normalize, num_features=mixer.num_features, extra=prefix)
    return o.transpose(1, 2).reshape(B, T, -1) @ mixer.out_proj.weight.T


def _based_explicit(mixer: Based, x: torch.Tensor) -> torch.Tensor:
    """o_t = sum_{s<=t} A_ts v_s / (sum A_ts + eps), A_ts = 1 + q·k/4 + (q·k)^2/32."""
    B, T, _ = x.shape
    H = mixer.num_heads
    q, k, v = (_heads(x @ p.weight.T, H) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    s = q @ k.transpose(-1, -2)
    A = (1 + s / 4 + s**2 / 32).tril()
    o = A @ v / (A.sum(-1, keepdim=True) + EPS)
    return o.transpose(1, 2).reshape(B, T, -1) @ mixer.out_proj.weight.T


def _short_conv_explicit(mixer: ShortConvMixer, x: torch.Tensor) -> torch.Tensor:
    """out_proj(silu(conv(u)) * gate), [u, gate] = in_proj(x)."""
    u, gate = (x @ mixer.in_proj.weight.T + mixer.in_proj.bias).chunk(2, dim=-1)
    y = _conv_silu(u, mixer.conv.weight) * gate
    return y @ mixer.out_proj.weight.T + mixer.out_proj.bias


def _jrt_explicit(mixer: JRTLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Linear attention plus every position's scores on the encoder's first M tokens."""
    H, M = mixer.num_heads, mixer.prefix_len
    q = x @ mixer.q_proj.weight.T
    if mixer.short_conv:
        q = _conv_silu(q, mixer.q_conv.weight)
    k_enc = _heads(x[:, :M] @ mixer.k_enc_proj.weight.T, H)
    v_enc = _heads(x[:, :M] @ mixer.v_enc_proj.weight.T, H)
    A_enc = _kernel(_heads(q, H), k_enc, mixer.feature_map.name)  # [B, H, T, M]: no mask
    return _linear_attention_explicit(mixer, x, prefix=(A_enc, v_enc))


EXPLICIT = {
    "linear_attn": _linear_attention_explicit,
    "based": _based_explicit,
    "short_conv": _short_conv_explicit,
    "jrt": _jrt_explicit,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("key", MIXERS)
def test_equals_explicit_form(key, dtype):
    mixer = build(key).double().eval()
    x = randn(2, 19, D_MODEL, seed=5, dtype=torch.float64)
    with torch.no_grad():
        ref = EXPLICIT[MIXERS[key][0]](mixer, x)
        y = mixer.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert_close(key, ref, y, F64 if dtype == torch.float64 else F32)


# --------------------------------------------------------------------------------------
# JRT: non-causal inside the prefix, causal after it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [5, 12], ids=["t=M-1", "t=12"])
def test_jrt_is_causal_from_the_prefix_end(t):
    check_causal(build("jrt-M6-H4-F4-taylor-plain"), seq_len=20, t=t)


def test_jrt_prefix_outputs_see_the_whole_prefix():
    mixer = build("jrt-M6-H4-F4-taylor-plain").double().eval()
    x = randn(2, 12, D_MODEL, seed=6, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5] += 1.0  # the last prefix token
    with torch.no_grad():
        y, y_changed = mixer(x), mixer(changed)
    for t in range(5):
        shift = (y[:, t] - y_changed[:, t]).norm() / y[:, t].norm()
        assert shift > 1e-3, f"output {t} ignores the later prefix token 5 (shift {shift:.2e})"


def test_jrt_short_prompt_is_the_prefix():
    """A prompt of 5 < M = 8 tokens, then decoding == a full forward with prefix_len 5."""
    mixer = build_mixer("jrt", D_MODEL, prefix_len=8, num_heads=4, feature_dim=4).double().eval()
    as_read = build_mixer("jrt", D_MODEL, prefix_len=5, num_heads=4, feature_dim=4).double()
    as_read.load_state_dict(mixer.state_dict())
    x = randn(2, 9, D_MODEL, seed=7, dtype=torch.float64)
    with torch.no_grad():
        cache = mixer.init_cache(2, dtype=x.dtype)
        pieces = [mixer(x[:, :5], cache=cache)]
        pieces += [mixer(x[:, t : t + 1], cache=cache) for t in range(5, 9)]
        full = as_read(x)
    assert cache.seen == 9
    assert_close("short prompt + decode", full, torch.cat(pieces, dim=1), 1e-10)


def test_jrt_chunk_inside_the_prefix_raises():
    mixer = build_mixer("jrt", D_MODEL, prefix_len=8, num_heads=4, feature_dim=4)
    x = randn(1, 9, D_MODEL, seed=8)
    cache = mixer.init_cache(1)
    mixer(x[:, :5], cache=cache)
    with pytest.raises(ValueError, match=r"starts at position 5.*prefix_len=8"):
        mixer(x[:, 5:], cache=cache)


# --------------------------------------------------------------------------------------
# Building and bad options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls, defaults",
    [
        ("linear_attn", LinearAttention, {"num_heads": 4, "feature_dim": 16, "feature_map": "elu",
                                          "normalize": True, "decay": None, "short_conv": False,
                                          "conv_size": 4}),
        ("based", Based, {"num_heads": 16}),
        ("short_conv", ShortConvMixer, {"kernel_size": 3, "expand": 1}),
        ("jrt", JRTLinearAttention, {"prefix_len": 64, "num_heads": 16, "feature_dim": 16,
                                     "feature_map": "taylor", "normalize": True, "decay": None,
                                     "short_conv": False, "conv_size": 4}),
    ],
)  # fmt: skip
def test_build_mixer_defaults(name, cls, defaults):
    assert mixer_options(name) == defaults
    mixer = build_mixer(name, 64, layer_idx=3)
    assert type(mixer) is cls and mixer.name == name and mixer.layer_idx == 3
    assert mixer.aux_loss is None


BAD_OPTIONS = [
    ("linear_attn", {"num_heads": 3}, "d_model=32 must be divisible by num_heads=3"),
    ("linear_attn", {"num_heads": 0}, "num_heads must be an int >= 1"),
    ("linear_attn", {"feature_dim": 0}, "feature_dim must be an int >= 1"),
    ("linear_attn", {"feature_map": "softmax"}, "feature_map must be one of"),
    ("linear_attn", {"decay": "mamba"}, "decay must be one of"),
    ("linear_attn", {"short_conv": True, "conv_size": 1}, "conv_size must be an int >= 2"),
    ("linear_attn", {"short_conv": True, "conv_size": 9}, r"conv_size must be in \[2, 8\]"),
    ("based", {"num_heads": 5}, "d_model=32 must be divisible by num_heads=5"),
    ("based", {"feature_dim": 8}, "unknown option"),
    ("short_conv", {"kernel_size": 1}, r"kernel_size must be an int in \[2, 8\]"),
    ("short_conv", {"expand": 0}, "expand must be an int >= 1"),
    ("jrt", {"prefix_len": 0}, "prefix_len must be an int >= 1"),
    ("jrt", {"num_heads": 5}, "d_model=32 must be divisible by num_heads=5"),
]


@pytest.mark.parametrize(
    "name, options, match",
    BAD_OPTIONS,
    ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in o.items()) for n, o, _ in BAD_OPTIONS],
)
def test_bad_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(name, D_MODEL, **options)


@pytest.mark.parametrize("key", ["linear_attn-H4-F16-elu-norm", "based-H4", "short_conv-W3-E1",
                                 "jrt-M4-H16-F16-taylor-norm"])  # fmt: skip
def test_wrong_width_raises(key):
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=32\]"):
        build(key)(torch.zeros(1, 3, 16))
