"""split_linear: one product per part of a projection, the same values and gradients as
splitting the whole product."""

import pytest
import torch
from torch import nn

from memzoo.kernels.testing import assert_close
from memzoo.models.mixers.base import split_linear


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_split_linear_equals_splitting_the_product(bias):
    torch.manual_seed(0)
    linear = nn.Linear(6, 9, bias=bias).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    sizes = [3, 5, 1]
    parts = split_linear(x, linear, sizes)
    refs = linear(x).split(sizes, dim=-1)
    assert [p.shape[-1] for p in parts] == sizes
    assert all(p.is_contiguous() for p in parts)
    for i, (ref, part) in enumerate(zip(refs, parts, strict=True)):
        assert_close(f"part {i}", ref, part, 1e-12)
    cotangents = [torch.randn_like(ref) for ref in refs]
    leaves = [x, *linear.parameters()]
    grads_ref = torch.autograd.grad(refs, leaves, cotangents)
    grads = torch.autograd.grad(parts, leaves, cotangents)
    for name, ref, out in zip(["dx", "dweight", "dbias"], grads_ref, grads, strict=False):
        assert_close(name, ref, out, 1e-12)
