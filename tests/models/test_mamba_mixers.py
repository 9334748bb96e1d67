"""The Mamba-1 (`mamba`) and Mamba-2 (`mamba2`) mixers: the mixer contract, mamba-ssm's init,
and equality with a token-by-token fp64 recurrence written here from the layers' own weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.testing import assert_close, randn
from memzoo.models.mixers import build_mixer, mixer_options
from memzoo.models.mixers.mamba import Mamba
from memzoo.models.mixers.mamba2 import Mamba2
from tests.models.mixer_checks import (
    check_causal,
    check_gradients,
    check_prefill_decode,
    check_varlen,
)

D_MODEL = 32

# (registry name, options, test id): small shapes covering both mixers and mamba2's groups.
CONFIGS = [
    ("mamba", dict(d_state=8), "mamba-N8"),
    ("mamba", dict(d_state=4, d_conv=2, expand=1, dt_rank=3), "mamba-N4-W2-E1-R3"),
    ("mamba2", dict(d_state=8, headdim=16, ngroups=1), "mamba2-N8-P16-G1"),
    ("mamba2", dict(d_state=8, headdim=16, ngroups=2), "mamba2-N8-P16-G2"),
    ("mamba2", dict(d_state=6, headdim=8, ngroups=4, d_conv=3), "mamba2-N6-P8-G4-W3"),
]
CONFIG_IDS = [c[2] for c in CONFIGS]


def build(name: str, options: dict, *, seed: int = 0):
    torch.manual_seed(seed)
    return build_mixer(name, D_MODEL, 0, **options)


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_causal(name, options, _):
    check_causal(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_prefill_then_decode_equals_full_forward(name, options, _):
    check_prefill_decode(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS[::2], ids=CONFIG_IDS[::2])
def test_single_token_prompt_then_chunks(name, options, _):
    """The first call is already a one-token decode step from the zero state."""
    check_prefill_decode(build(name, options), prompt=1, chunk=2, decode=3)


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_varlen_equals_each_sequence_alone(name, options, _):
    check_varlen(build(name, options))


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_gradients_reach_every_parameter(name, options, _):
    check_gradients(build(name, options))


# ---------------------------------------------------------------------------------------------
# Token-by-token fp64 recurrences from the layers' weights


def _linear(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def _conv_step(window, new, conv):
    """Shift `new` [B, C] into the window [B, C, W] and return silu(conv) of the window."""
    window = torch.cat([window[:, :, 1:], new[:, :, None]], dim=2)
    y = (window * conv.weight).sum(-1)
    if conv.bias is not None:
        y = y + conv.bias
    return window, F.silu(y)


def mamba_loop(layer: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba-1, one token at a time: h = exp(dt A) h + dt B u, y = (C h + D u) silu(z)."""
    batch, T, _ = x.shape
    N, R = layer.d_state, layer.dt_rank
    u_all, z_all = _linear(x, layer.in_proj).chunk(2, dim=-1)
    A = -torch.exp(layer.A_log)  # [d_inner, N]
    window = x.new_zeros(batch, layer.d_inner, layer.d_conv)
    h = x.new_zeros(batch, layer.d_inner, N)
    outs = []
    for t in range(T):
        window, u = _conv_step(window, u_all[:, t], layer.conv1d)
        dt_low, B, C = (u @ layer.x_proj.weight.T).split([R, N, N], dim=-1)
        dt = F.softplus(dt_low @ layer.dt_proj.weight.T + layer.dt_proj.bias)  # [B, d_inner]
        h = torch.exp(dt[:, :, None] * A) * h + dt[:, :, None] * B[:, None, :] * u[:, :, None]
        y = (h * C[:, None, :]).sum(-1) + layer.D * u
        outs.append(_linear(y * F.silu(z_all[:, t]), layer.out_proj))
    return torch.stack(outs, dim=1)


def mamba2_loop(layer: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """Mamba-2, one token at a time, per head h and group g = h // (H / G):
    state = exp(dt A_h) state + dt x B_g^T, y = state C_g + D_h x, out = rmsnorm_G(y silu(z))."""
    batch, T, _ = x.shape
    H, P, N, G = layer.nheads, layer.headdim, layer.d_state, layer.ngroups
    d_inner = layer.d_inner
    z_all, xBC_all, dt_all = _linear(x, layer.in_proj).split([d_inner, layer.conv_dim, H], dim=-1)
    A = -torch.exp(layer.A_log)  # [H]
    window = x.new_zeros(batch, layer.conv_dim, layer.d_conv)
    state = x.new_zeros(batch, H, P, N)
    outs = []
    for t in range(T):
        window, xBC = _conv_step(window, xBC_all[:, t], layer.conv1d)
        xs = xBC[:, :d_inner].reshape(batch, H, P)
        B = xBC[:, d_inner : d_inner + G * N].reshape(batch, G, N)
        C = xBC[:, d_inner + G * N :].reshape(batch, G, N)
        group = torch.arange(H) // (H // G)
        B, C = B[:, group], C[:, group]  # [batch, H, N]
        dt = F.softplus(dt_all[:, t] + layer.dt_bias)  # [batch, H]
        decay = torch.exp(dt * A)[:, :, None, None]
        state = decay * state + (dt[:, :, None] * xs)[:, :, :, None] * B[:, :, None, :]
        y = (state * C[:, :, None, :]).sum(-1) + layer.D[:, None] * xs  # [batch, H, P]
        gated = (y.reshape(batch, d_inner) * F.silu(z_all[:, t])).reshape(batch, G, -1)
        normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + layer.norm.eps)
        outs.append(_linear(normed.reshape(batch, d_inner) * layer.norm.weight, layer.out_proj))
    return torch.stack(outs, dim=1)


def _randomise_trivial_params(layer, seed: int) -> None:
    """Give the parameters that start as constants (D, norm weights) distinct values, so that a
    swapped index or a dropped term shows up in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.D.copy_(torch.rand(layer.D.shape, generator=g, dtype=torch.float64) + 0.5)
        if isinstance(layer, Mamba2):
            layer.norm.weight.copy_(torch.rand(layer.d_inner, generator=g, dtype=torch.float64))


@pytest.mark.parametrize(
    "dtype,ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_forward_equals_token_by_token_recurrence(name, options, _, dtype, ratio):
    layer = build(name, options, seed=5).double()
    _randomise_trivial_params(layer, seed=6)
    x = randn(2, 23, D_MODEL, seed=7, dtype=torch.float64)
    loop = mamba_loop if name == "mamba" else mamba2_loop
    with torch.no_grad():
        expected = loop(layer, x)
        out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert_close(f"{name} forward vs fp64 loop", expected, out, ratio)


@pytest.mark.parametrize("name,options,_", CONFIGS[::2], ids=CONFIG_IDS[::2])
def test_decode_equals_token_by_token_recurrence(name, options, _):
    """Decode alone (every token through the *_step kernels) matches the hand-written loop."""
    layer = build(name, options, seed=8).double().eval()
    x = randn(2, 9, D_MODEL, seed=9, dtype=torch.float64)
    loop = mamba_loop if name == "mamba" else mamba2_loop
    with torch.no_grad():
        cache = layer.init_cache(2, dtype=x.dtype)
        out = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(x.shape[1])], dim=1)
        assert_close(f"{name} decode vs fp64 loop", loop(layer, x), out, 1e-12)


# ---------------------------------------------------------------------------------------------
# Initialisation (mamba-ssm's)


def test_mamba_init_matches_mamba_ssm():
    layer = Mamba(64, d_state=8)
    assert (layer.d_inner, layer.dt_rank) == (128, 4)  # expand 2, dt_rank = ceil(64 / 16)
    expected_A = -torch.arange(1, 9, dtype=torch.float32).expand(128, 8)
    assert_close("A", expected_A, -torch.exp(layer.A_log), 1e-7)
    assert torch.equal(layer.D, torch.ones(128))
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.abs().max() <= bound
    assert layer.dt_proj.weight.abs().max() > 0.8 * bound  # uniform over the whole range
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert layer.in_proj.bias is None and layer.out_proj.bias is None and layer.x_proj.bias is None
    assert layer.conv1d.bias is not None


def test_mamba2_init_matches_mamba_ssm():
    layer = Mamba2(64, d_state=16, headdim=16)
    assert (layer.d_inner, layer.nheads, layer.conv_dim) == (128, 8, 128 + 2 * 16)
    A = -torch.exp(layer.A_log)
    assert A.shape == (8,) and A.min() >= -16 and A.max() <= -1
    assert torch.equal(layer.D, torch.ones(8))
    dt = F.softplus(layer.dt_bias)
    assert dt.shape == (8,) and dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert torch.equal(layer.norm.weight, torch.ones(128)) and layer.norm.group_count == 1
    assert layer.in_proj.weight.shape == (2 * 128 + 2 * 16 + 8, 64)
    assert layer.in_proj.bias is None and layer.out_proj.bias is None


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_dt_init_floor_lifts_small_time_steps(name):
    """dt is drawn in [dt_min, dt_max], then floored: every softplus(bias) >= dt_init_floor."""
    torch.manual_seed(0)
    options = dict(d_state=4, dt_min=1e-6, dt_max=1e-2, dt_init_floor=1e-3)
    if name == "mamba2":
        options["headdim"] = 1  # 64 heads, 64 draws
    layer = build_mixer(name, D_MODEL, **options)
    bias = layer.dt_proj.bias if name == "mamba" else layer.dt_bias
    dt = F.softplus(bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-2 * (1 + 1e-5)
    assert (dt < 1e-3 * (1 + 1e-5)).any()  # some draws fell below the floor


@pytest.mark.parametrize(
    "name,names",
    [("mamba", ["A_log", "D"]), ("mamba2", ["A_log", "D", "dt_bias"])],
    ids=["mamba", "mamba2"],
)
def test_no_weight_decay_marks(name, names):
    layer = build_mixer(name, D_MODEL, d_state=4)
    marked = sorted(n for n, p in layer.named_parameters() if getattr(p, "_no_weight_decay", 0))
    assert marked == names


def test_mamba_dt_bias_survives_lm_bias_reinit():
    assert getattr(Mamba(D_MODEL).dt_proj.bias, "_no_reinit", False)


def test_mamba2_a_init_range_option():
    torch.manual_seed(0)
    layer = Mamba2(D_MODEL, d_state=4, headdim=1, A_init_range=(2.0, 3.0))
    A = -torch.exp(layer.A_log)
    assert A.min() >= -3.0 and A.max() <= -2.0


# ---------------------------------------------------------------------------------------------
# State size and cache


@pytest.mark.parametrize("name,options,_", CONFIGS, ids=CONFIG_IDS)
def test_state_size_formula_and_cache_size(name, options, _):
    layer = build(name, options)
    if name == "mamba":
        expected = layer.d_inner * (layer.d_state + layer.d_conv - 1)
    else:
        expected = layer.nheads * layer.headdim * layer.d_state + layer.conv_dim * (
            layer.d_conv - 1
        )
    assert layer.state_size(1) == layer.state_size(10_000) == expected
    cache = layer.init_cache(3)
    per_sequence = (cache.conv_state.numel() + cache.ssm_state.numel()) // 3
    assert per_sequence == expected
    assert cache.ssm_state.dtype == torch.float32 and not cache.ssm_state.any()


def test_state_size_numbers():
    # mamba: d_inner 64 * (8 + 3); mamba2: 4 heads * 16 * 8 + (64 + 2 * 2 * 8) * 3.
    assert Mamba(D_MODEL, d_state=8).state_size(100) == 64 * 11
    assert Mamba2(D_MODEL, d_state=8, headdim=16, ngroups=2).state_size(100) == 512 + 96 * 3


def test_cache_layouts():
    cache = Mamba(D_MODEL, d_state=8).init_cache(2)
    assert cache.conv_state.shape == (2, 64, 3) and cache.ssm_state.shape == (2, 64, 8)
    cache = Mamba2(D_MODEL, d_state=8, headdim=16, ngroups=2).init_cache(2, dtype=torch.bfloat16)
    assert cache.conv_state.shape == (2, 96, 3) and cache.ssm_state.shape == (2, 4, 16, 8)
    assert cache.ssm_state.dtype == torch.float32  # fp32 state for low-precision activations


# ---------------------------------------------------------------------------------------------
# Registry and options


def test_built_by_name_with_paper_defaults():
    assert isinstance(build_mixer("mamba", D_MODEL), Mamba)
    assert isinstance(build_mixer("mamba2", 64), Mamba2)
    assert Mamba.name == "mamba" and Mamba2.name == "mamba2"
    mamba = mixer_options("mamba")
    assert (mamba["d_state"], mamba["d_conv"], mamba["expand"], mamba["dt_rank"]) == (
        16,
        4,
        2,
        "auto",
    )
    assert (mamba["dt_min"], mamba["dt_max"], mamba["dt_init_floor"]) == (1e-3, 1e-1, 1e-4)
    mamba2 = mixer_options("mamba2")
    assert (mamba2["d_state"], mamba2["headdim"], mamba2["ngroups"], mamba2["expand"]) == (
        128,
        64,
        1,
        2,
    )
    assert tuple(mamba2["A_init_range"]) == (1, 16)


def test_dt_rank_auto_is_ceil_d_model_over_16():
    assert Mamba(40).dt_rank == math.ceil(40 / 16) == 3


BAD_OPTIONS = [
    ("mamba", dict(d_state=0), "d_state"),
    ("mamba", dict(d_conv=1), "d_conv"),
    ("mamba", dict(dt_rank="full"), "dt_rank"),
    ("mamba", dict(dt_rank=0), "dt_rank"),
    ("mamba", dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    ("mamba", dict(expand=0), "expand"),
    ("mamba", dict(dt_scale=0.0), "dt_scale"),
    ("mamba", dict(headdim=16), "unknown option"),
    ("mamba2", dict(headdim=48), "headdim=48"),
    ("mamba2", dict(headdim=16, ngroups=3), "ngroups=3"),
    ("mamba2", dict(A_init_range=(0.0, 4.0)), "A_init_range"),
    ("mamba2", dict(d_conv=9), "d_conv"),
    ("mamba2", dict(dt_min=-1.0), "dt_min"),
]


@pytest.mark.parametrize(
    "name,options,match",
    BAD_OPTIONS,
    ids=[f"{n}-" + "-".join(f"{k}={v}" for k, v in o.items()) for n, o, _ in BAD_OPTIONS],
)
def test_bad_options_raise_naming_the_option(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(name, D_MODEL, **options)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_bad_input_raises(name):
    layer = build_mixer(name, D_MODEL, d_state=4, **({"headdim": 16} if name == "mamba2" else {}))
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(2, 5, 16))


# ---------------------------------------------------------------------------------------------
# On a GPU: the Triton kernels inside the mixers


@pytest.mark.gpu
@pytest.mark.parametrize("name,options,_", CONFIGS[::2], ids=CONFIG_IDS[::2])
def test_gpu_mixer_matches_the_cpu_path(name, options, _):
    """One long sequence on CUDA takes the Triton kernels (Mamba's selective scan cut into
    segments, forward and backward, and its one-kernel decode step; Mamba-2's linear-attention
    kernels): prefill, decode and every parameter's gradient match the CPU torch path in fp32."""
    # Explicit default devices: the kernel tests, in the same process, make it CUDA.
    with torch.device("cpu"):
        base = build(name, options, seed=10)
    x = randn(1, 1100, D_MODEL, seed=11, dtype=torch.float32, device="cpu")
    outs = {}
    for where in ("cpu", "cuda"):
        layer = copy.deepcopy(base).to(where)
        with torch.device(where):
            inputs = x.to(where)
            y = layer(inputs)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            with torch.no_grad():
                cache = layer.init_cache(1, dtype=torch.float32)
                prefill = layer(inputs[:, :1000], cache=cache)
                steps = [layer(inputs[:, t : t + 1], cache=cache) for t in range(1000, 1100)]
        grads = {n: p.grad for n, p in layer.named_parameters()}
        outs[where] = (y.detach(), torch.cat([prefill, *steps], dim=1), grads)
    (y_cpu, decoded_cpu, grads_cpu), (y_gpu, decoded_gpu, grads_gpu) = outs["cpu"], outs["cuda"]
    assert_close("forward", y_cpu, y_gpu.cpu(), 1e-4)
    assert_close("prefill + decode", y_cpu, decoded_gpu.cpu(), 1e-4)
    assert_close("prefill + decode (cpu)", y_cpu, decoded_cpu, 1e-5)
    for n, g in grads_cpu.items():
        assert_close(f"d{n}", g, grads_gpu[n].cpu(), 1e-4)
