"""The fused D skip and silu(z) gate (`selective_scan/gate_triton.py`) vs fp64 torch, forward
and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from memzoo.kernels.selective_scan.gate_triton import BLOCK_C, BLOCK_R, skip_and_gate_triton
from memzoo.kernels.testing import TEST_DEVICE, assert_close, randn


def reference(y, u, D, z):
    out = y.double()
    if D is not None:
        out = out + D.double() * u.double()
    if z is not None:
        out = out * F.silu(z.double())
    return out


def leaves(shape, *, has_D, has_z, y_dtype, dtype, seed=0):
    """y, u, D, z as leaves that want gradients (D, z None unless asked)."""
    C = shape[-1]
    return (
        randn(*shape, seed=seed, dtype=y_dtype, requires_grad=True),
        randn(*shape, seed=seed + 1, dtype=dtype, requires_grad=True),
        randn(C, seed=seed + 2, requires_grad=True) if has_D else None,
        randn(*shape, seed=seed + 3, dtype=dtype, scale=2.0, requires_grad=True) if has_z else None,
    )


# Rows and channels that leave partial tiles on both axes, and a single partial tile.
SHAPES = [(2, BLOCK_R + 5, BLOCK_C + 72), (1, 3, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_D,has_z", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(
    "y_dtype,dtype,tol",
    # The selective scan's fp32 output with fp32 or fp16 activations; SSD's output in x's dtype.
    [(torch.float32, torch.float32, 1e-6), (torch.float32, torch.float16, 2e-3),
     (torch.float16, torch.float16, 2e-3)],
)  # fmt: skip
def test_forward_and_gradients_match_fp64(shape, has_D, has_z, y_dtype, dtype, tol):
    y, u, D, z = leaves(shape, has_D=has_D, has_z=has_z, y_dtype=y_dtype, dtype=dtype)
    out = skip_and_gate_triton(y, u, D, z)
    ref = reference(y, u, D, z)
    assert out.dtype == dtype
    assert_close("out", ref, out, tol)

    dout = randn(*shape, seed=9, dtype=dtype)
    named = {"y": y, "u": u, "D": D, "z": z}
    named = {k: t for k, t in named.items() if t is not None and (k != "u" or has_D)}
    grads = torch.autograd.grad(out, list(named.values()), dout)
    grads_ref = torch.autograd.grad(ref, list(named.values()), dout.double())
    for (name, t), g, g_ref in zip(named.items(), grads, grads_ref, strict=True):
        assert g.dtype == t.dtype, name
        assert_close(f"d{name}", g_ref, g, tol)


def test_u_gets_no_gradient_without_D():
    y, u, _, z = leaves((2, 5, 9), has_D=False, has_z=True, y_dtype=torch.float32,
                        dtype=torch.float32)  # fmt: skip
    skip_and_gate_triton(y, u, None, z).sum().backward()
    assert u.grad is None
    assert y.grad is not None and z.grad is not None


def test_neither_D_nor_z_is_a_cast():
    y = randn(3, 4, 5, seed=1)
    u = randn(3, 4, 5, seed=2, dtype=torch.float16)
    out = skip_and_gate_triton(y, u, None, None)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, y.to(torch.float16), rtol=0, atol=0)


def test_no_rows():
    y, u, D, z = leaves((2, 0, 9), has_D=True, has_z=True, y_dtype=torch.float32,
                        dtype=torch.float32)  # fmt: skip
    out = skip_and_gate_triton(y, u, D, z)
    assert out.shape == (2, 0, 9)
    out.sum().backward()
    torch.testing.assert_close(D.grad, torch.zeros(9, device=TEST_DEVICE))
