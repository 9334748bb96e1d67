"""Feature maps for linear attention: sizes, Taylor dot products, dtypes, lookup errors."""

import math

import pytest
import torch

from memzoo.kernels.linear_attn import FEATURE_MAPS, get_feature_map, linear_attn
from memzoo.kernels.testing import assert_close, randn

TAYLOR = ["taylor", "taylor_compressed"]


@pytest.mark.parametrize(
    "name,d,size",
    [
        ("identity", 16, 16),
        ("elu", 16, 16),
        ("relu", 16, 16),
        ("taylor", 16, 273),
        ("taylor_compressed", 16, 153),
        ("taylor", 5, 31),
        ("taylor_compressed", 5, 21),
    ],
    ids=lambda v: str(v),
)
def test_output_size(name, d, size):
    phi = get_feature_map(name)
    assert phi.name == name and phi.output_size(d) == size
    assert phi(randn(2, 3, d, seed=d)).shape == (2, 3, size)


@pytest.mark.parametrize("d", [16, 7], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("name", TAYLOR)
def test_taylor_dot_product(name, d):
    """phi(q)·phi(k) = 1 + q·k / sqrt(d) + (q·k)^2 / (2 d), the 2nd-order Taylor series of exp."""
    phi = get_feature_map(name)
    q = randn(4, 9, d, seed=1, dtype=torch.float64)
    k = randn(4, 9, d, seed=2, dtype=torch.float64)
    qk = (q * k).sum(-1)
    expected = 1 + qk / math.sqrt(d) + qk**2 / (2 * d)
    assert_close("phi(q)·phi(k)", expected, (phi(q) * phi(k)).sum(-1), 1e-14)


def test_compressed_and_full_taylor_give_the_same_attention():
    q = randn(2, 33, 3, 16, seed=3, dtype=torch.float64)
    k = randn(2, 33, 3, 16, seed=4, dtype=torch.float64)
    v = randn(2, 33, 3, 8, seed=5, dtype=torch.float64)
    outputs = {}
    for name in TAYLOR:
        phi = get_feature_map(name)
        outputs[name], _ = linear_attn(phi(q), phi(k), v, normalize=True)
    assert_close("o", outputs["taylor"], outputs["taylor_compressed"], 1e-12)


def test_elu_plus_one_is_positive():
    # Down to x = -40, where elu(x) + 1 computed literally rounds to 0 in fp32.
    x = torch.cat([randn(1000, seed=6, scale=10.0), torch.tensor([-40.0])])
    phi = get_feature_map("elu")
    assert (phi(x) > 0).all()
    moderate = x.clamp(-5, 5)
    assert_close("elu + 1", torch.nn.functional.elu(moderate) + 1, phi(moderate), 1e-7)
    assert (get_feature_map("relu")(x) >= 0).all()
    assert torch.equal(get_feature_map("identity")(x), x)


@pytest.mark.parametrize(
    "dtype",
    [torch.float16, torch.bfloat16, torch.float32, torch.float64],
    ids=["fp16", "bf16", "fp32", "fp64"],
)
@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_keeps_dtype(name, dtype):
    assert get_feature_map(name)(randn(3, 4, seed=7, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
def test_differentiable(name):
    x = randn(2, 5, seed=8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(get_feature_map(name), (x,))


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown feature map 'softmax'.*taylor_compressed"):
        get_feature_map("softmax")
