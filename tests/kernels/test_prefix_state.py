"""prefix_state: the JRT-RNN encoder prefix as linear attention's initial state."""

import importlib

import pytest
import torch

from memzoo.kernels import linear_attn, prefix_state
from memzoo.kernels.linear_attn import get_feature_map
from memzoo.kernels.testing import (
    assert_close,
    bad_cu_seqlens_values,
    cu_seqlens_from_lengths,
    randn,
)

F64 = 1e-12


def jrt_explicit(q, k, v, k_enc, v_enc, *, normalize, scale=1.0, eps=1e-6):
    """y_i = s phi(q_i)·[sum_{j<=i} k_j^T v_j + sum_{j<M} ke_j^T ve_j], over the normaliser
    s phi(q_i)·[sum_{j<=i} k_j + sum_{j<M} ke_j] + eps when `normalize` (inputs mapped already)."""
    B, T, H, _ = q.shape
    S_enc = torch.einsum("bmhk,bmhv->bhkv", k_enc, v_enc)
    z_enc = k_enc.sum(1)
    y = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for i in range(T):
        S_i = S_enc + torch.einsum("bjhk,bjhv->bhkv", k[:, : i + 1], v[:, : i + 1])
        y[:, i] = scale * torch.einsum("bhk,bhkv->bhv", q[:, i], S_i)
        if normalize:
            z_i = z_enc + k[:, : i + 1].sum(1)
            y[:, i] = y[:, i] / (scale * (q[:, i] * z_i).sum(-1, keepdim=True) + eps)
    return y


def mapped_inputs(B, M, T, H, d, V, *, seed, feature_map="taylor_compressed"):
    phi = get_feature_map(feature_map)
    q, k = (phi(randn(B, T, H, d, seed=seed + i, dtype=torch.float64)) for i in range(2))
    v = randn(B, T, H, V, seed=seed + 2, dtype=torch.float64)
    k_enc = phi(randn(B, M, H, d, seed=seed + 3, dtype=torch.float64))
    v_enc = randn(B, M, H, V, seed=seed + 4, dtype=torch.float64)
    return q, k, v, k_enc, v_enc


@pytest.mark.parametrize("M", [1, 12], ids=lambda m: f"B2-M{m}-T9-H2-d4-V5")
def test_normalized_prefix_is_the_jrt_formula(M):
    q, k, v, k_enc, v_enc = mapped_inputs(2, M, 9, 2, 4, 5, seed=M)
    y, _ = linear_attn(
        q, k, v, normalize=True, initial_state=prefix_state(k_enc, v_enc, normalize=True)
    )
    assert_close("y", jrt_explicit(q, k, v, k_enc, v_enc, normalize=True), y, F64)


def test_unnormalized_prefix():
    q, k, v, k_enc, v_enc = mapped_inputs(2, 6, 9, 2, 4, 5, seed=3, feature_map="elu")
    y, _ = linear_attn(q, k, v, initial_state=prefix_state(k_enc, v_enc))
    scale = q.shape[-1] ** -0.5  # linear_attn's default without normalize
    assert_close("y", jrt_explicit(q, k, v, k_enc, v_enc, normalize=False, scale=scale), y, F64)


@pytest.mark.parametrize("block_tokens", [None, 2], ids=["one-block", "blocks-of-2"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_varlen_equals_per_prefix(normalize, block_tokens, monkeypatch):
    lengths = [3, 0, 5, 1]
    H, K, V = 2, 3, 4
    if block_tokens is not None:
        prefix = importlib.import_module("memzoo.kernels.linear_attn.prefix")
        monkeypatch.setattr(prefix, "_BLOCK_ELEMENTS", block_tokens * H * K * V)
    k_enc = randn(1, sum(lengths), H, K, seed=1, dtype=torch.float64, requires_grad=True)
    v_enc = randn(1, sum(lengths), H, V, seed=2, dtype=torch.float64, requires_grad=True)
    cu = cu_seqlens_from_lengths(lengths)
    packed = prefix_state(k_enc, v_enc, normalize=normalize, cu_seqlens=cu)
    offsets = cu.tolist()
    pieces = [
        prefix_state(k_enc[:, start:end], v_enc[:, start:end], normalize=normalize)
        for start, end in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    packed = list(packed) if normalize else [packed]
    ref = [torch.cat(p) for p in zip(*pieces, strict=True)] if normalize else [torch.cat(pieces)]
    grads = {}
    for name, states in (("packed", packed), ("ref", ref)):
        loss = sum(
            (s * randn(*s.shape, seed=9 + i, dtype=s.dtype)).sum() for i, s in enumerate(states)
        )
        grads[name] = torch.autograd.grad(loss, (k_enc, v_enc))
    for i, (r, out) in enumerate(zip(ref, packed, strict=True)):
        assert_close(f"state[{i}]", r, out, F64)
        assert not out[1].any(), "an empty prefix gives a zero state"
    for name, r, out in zip(["dk_enc", "dv_enc"], grads["ref"], grads["packed"], strict=True):
        assert_close(name, r, out, F64)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"]
)
def test_state_dtype(dtype):
    S, z = prefix_state(
        randn(1, 4, 2, 3, seed=1, dtype=dtype),
        randn(1, 4, 2, 5, seed=2, dtype=dtype),
        normalize=True,
    )
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert S.dtype == expected and z.dtype == expected
    assert S.shape == (1, 2, 3, 5) and z.shape == (1, 2, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"v_enc": torch.zeros(1, 5, 2, 4)}, ValueError, r"v_enc must have shape \[B=1, M=6"),
        ({"k_enc": torch.zeros(6, 2, 3)}, ValueError, r"k_enc must have 4 dims \[B, M, H, K\]"),
        ({"k_enc": torch.zeros(1, 6, 2, 3, dtype=torch.int32)}, TypeError, "k_enc must be a float"),
        ({"v_enc": "values"}, TypeError, "v_enc must be a torch.Tensor"),
        (
            {
                "k_enc": torch.zeros(2, 6, 2, 3),
                "v_enc": torch.zeros(2, 6, 2, 4),
                "cu_seqlens": torch.tensor([0, 6], dtype=torch.int32),
            },
            ValueError,
            "batch size must be 1",
        ),
        *bad_cu_seqlens_values(6, "M"),
        ({"cu_seqlens": torch.tensor([0, 6])}, TypeError, "int32"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_raises_clear_error(kwargs, error, match):
    args = {"k_enc": torch.zeros(1, 6, 2, 3), "v_enc": torch.zeros(1, 6, 2, 4), **kwargs}
    with pytest.raises(error, match=match):
        prefix_state(args.pop("k_enc"), args.pop("v_enc"), **args)
