"""attention: the oracle, the torch CPU path (full and blocked sliding window), varlen, KV-cache
decode, backend dispatch and bad input."""

import importlib
import math
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memzoo.kernels import KVCache, SlidingWindowCache, attention, attention_step
from memzoo.kernels.attention.reference import attention_ref, attention_torch
from memzoo.kernels.testing import (
    assert_close,
    bad_cu_seqlens_values,
    cu_seqlens_from_lengths,
    randn,
)

F64 = 1e-10  # relative RMSE between two fp64 computations
# memzoo.kernels.attention is the function (re-exported by memzoo.kernels); fetch the module.
attention_module = importlib.import_module("memzoo.kernels.attention")


def make_qkv(B, T, H, Hkv, D, *, seed, dtype=torch.float64):
    return (
        randn(B, T, H, D, seed=seed, dtype=dtype),
        randn(B, T, Hkv, D, seed=seed + 1, dtype=dtype),
        randn(B, T, Hkv, D, seed=seed + 2, dtype=dtype),
    )


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def forward_and_grads(fn, q, k, v, **kwargs):
    """o and (dq, dk, dv) for fixed random cotangents."""
    q, k, v = leaves(q, k, v)
    o = fn(q, k, v, **kwargs)
    (o * randn(*o.shape, seed=99, dtype=o.dtype)).sum().backward()
    return o, (q.grad, k.grad, v.grad)


def assert_same_attention(name, ref, out, ratio=F64):
    (o_ref, grads_ref), (o, grads) = ref, out
    assert_close(f"{name} o", o_ref, o, ratio)
    for label, g_ref, g in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(f"{name} {label}", g_ref, g, ratio)


def per_sequence(q, k, v, lengths, **options):
    """The oracle on each packed sequence alone, outputs concatenated along T."""
    offsets = cu_seqlens_from_lengths(lengths).tolist()
    return torch.cat(
        [
            attention_ref(q[:, s:e], k[:, s:e], v[:, s:e], **options)
            for s, e in zip(offsets[:-1], offsets[1:], strict=True)
        ],
        dim=1,
    )


def attention_by_loops(q, k, v, *, causal, window, scale):
    """Attention one (batch, head, query) at a time with math.exp: shares no code with the rest."""
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    o = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [
                    j
                    for j in range(T)
                    if (not causal or j <= i) and (window is None or j > i - window)
                ]
                scores = [scale * float(q[b, i, h] @ k[b, j, h // groups]) for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, w in zip(keys, weights, strict=True):
                    o[b, i, h] += w / total * v[b, j, h // groups]
    return o


# ---- the oracle ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causal,window",
    [(False, None), (True, None), (True, 1), (True, 3), (True, 7)],
    ids=["full", "causal", "w1", "w3", "w7"],
)
def test_ref_equals_explicit_loops(causal, window):
    q, k, v = make_qkv(2, 7, 4, 2, 3, seed=1)
    expected = attention_by_loops(q, k, v, causal=causal, window=window, scale=0.6)
    assert_close(
        "o", expected, attention_ref(q, k, v, causal=causal, window=window, scale=0.6), F64
    )


# ---- the torch path against the oracle, forward and gradients -------------------------------

CASES = [
    # (T, D, H, Hkv, causal, window): every T, D, head layout and window kind appears.
    (1, 16, 1, 1, True, None),
    (1, 32, 4, 2, True, 1),
    (17, 16, 4, 2, False, None),
    (17, 32, 1, 1, True, 16),
    (17, 64, 4, 2, True, 64),
    (64, 16, 4, 2, True, 16),
    (64, 64, 1, 1, True, None),
    (64, 32, 4, 2, True, 1),
    (130, 16, 4, 2, True, 16),
    (130, 32, 1, 1, True, 64),
    (130, 64, 4, 2, False, None),
    (130, 16, 1, 1, True, 200),
    (130, 32, 4, 2, True, None),
]


def case_id(T, D, H, Hkv, causal, window):
    kind = "noncausal" if not causal else "causal" if window is None else f"w{window}"
    return f"B2-T{T}-D{D}-H{H}-Hkv{Hkv}-{kind}"


@pytest.mark.parametrize("T,D,H,Hkv,causal,window", CASES, ids=[case_id(*c) for c in CASES])
def test_torch_path_equals_ref(T, D, H, Hkv, causal, window):
    q, k, v = make_qkv(2, T, H, Hkv, D, seed=T + D + H)
    options = {"causal": causal, "window": window, "scale": D**-0.5}
    ref = forward_and_grads(attention_ref, q, k, v, **options)
    out = forward_and_grads(attention_torch, q, k, v, **options)
    assert_same_attention("torch path", ref, out)


@pytest.mark.parametrize("block_size", [1, 7, 16, 64, 256])
def test_block_size_does_not_change_the_result(block_size):
    q, k, v = make_qkv(1, 100, 4, 2, 8, seed=3)
    options = {"causal": True, "window": 20, "scale": 0.5}
    ref = forward_and_grads(attention_ref, q, k, v, **options)
    out = forward_and_grads(attention_torch, q, k, v, **options, block_size=block_size)
    assert_same_attention(f"block {block_size}", ref, out)


@pytest.mark.parametrize(
    "dtype,ratio",
    [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)],
    ids=["fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("window", [None, 8], ids=["causal", "w8"])
def test_low_precision_returns_q_dtype(dtype, ratio, window):
    q, k, v = make_qkv(2, 40, 4, 2, 16, seed=5)
    o_ref = attention_ref(q, k, v, causal=True, window=window, scale=0.25)
    o = attention(q.to(dtype), k.to(dtype), v.to(dtype), window=window, scale=0.25)
    assert o.dtype == dtype
    assert_close("o", o_ref, o, ratio)


@pytest.mark.parametrize(
    "causal,window,lengths",
    [(False, None, None), (True, None, None), (True, 24, None), (True, 24, [30, 0, 70])],
    ids=["noncausal", "causal", "w24", "w24-varlen"],
)
def test_fp32_forward_and_gradients(causal, window, lengths):
    """fp32 runs other SDPA kernels than fp64 (CPU flash attention): check them too."""
    q, k, v = make_qkv(1, 100, 4, 2, 32, seed=6)
    options = {"causal": causal, "window": window, "scale": 0.2}
    if lengths is None:
        ref = forward_and_grads(attention_ref, q, k, v, **options)
        cu = None
    else:
        ref = forward_and_grads(per_sequence, q, k, v, lengths=lengths, **options)
        cu = cu_seqlens_from_lengths(lengths)
    q, k, v = (x.float() for x in (q, k, v))
    out = forward_and_grads(attention_torch, q, k, v, **options, cu_seqlens=cu)
    assert_same_attention("fp32", ref, out, 1e-5)


def test_window_at_least_t_is_full_causal():
    q, k, v = make_qkv(1, 30, 2, 2, 8, seed=7)
    full = attention(q, k, v)
    for window in (30, 31, 1000):
        assert_close(f"window {window}", full, attention(q, k, v, window=window), F64)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = make_qkv(1, 12, 2, 1, 9, seed=9)
    o_ref = attention_ref(q, k, v, causal=True, window=None, scale=9**-0.5)
    assert_close("o", o_ref, attention(q, k, v), F64)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = make_qkv(1, 33, 6, 2, 8, seed=11)
    k3, v3 = (x.repeat_interleave(3, dim=2) for x in (k, v))
    for window in (None, 5):
        assert_close(
            f"window {window}",
            attention(q, k3, v3, window=window),
            attention(q, k, v, window=window),
            F64,
        )


# ---- the windowed path never builds a [T, T] tensor -----------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op produces (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def largest_tensor_of_windowed_attention(T, window):
    q, k, v = leaves(*make_qkv(1, T, 2, 1, 16, seed=13, dtype=torch.float32))
    cotangent = randn(1, T, 2, 16, seed=14)
    with LargestTensor() as mode:
        attention_torch(q, k, v, causal=True, window=window, scale=0.25).backward(cotangent)
    return mode.numel


def test_windowed_memory_is_linear_in_t():
    """Doubling T doubles the largest intermediate (a [T, T] one would quadruple), and at
    T=4096 it is far below T * T."""
    small = largest_tensor_of_windowed_attention(2048, 16)
    large = largest_tensor_of_windowed_attention(4096, 16)
    assert large <= 2 * small
    assert large < 4096 * 4096 // 32


def test_long_windowed_sequence_equals_dense_on_slices():
    T, window = 4096, 16
    q, k, v = make_qkv(1, T, 2, 1, 16, seed=15, dtype=torch.float32)
    o = attention(q, k, v, window=window)
    for start, end in ((0, 50), (2000, 2100), (T - 40, T)):
        # Queries [start, end) see keys from start - window + 1 on: run the oracle on that slice.
        first = max(start - window + 1, 0)
        piece = (x[:, first:end].double() for x in (q, k, v))
        o_ref = attention_ref(*piece, causal=True, window=window, scale=0.25)
        assert_close(f"rows {start}:{end}", o_ref[:, start - first :], o[:, start:end], 1e-6)


# ---- packed sequences -------------------------------------------------------------------------

LENGTHS = [1, 37, 0, 64, 5]


@pytest.mark.parametrize(
    "causal,window",
    [(False, None), (True, None), (True, 16), (True, 50)],
    ids=["full", "causal", "w16", "w50"],
)
def test_varlen_equals_per_sequence(causal, window):
    q, k, v = make_qkv(1, sum(LENGTHS), 4, 2, 16, seed=17)
    options = {"causal": causal, "window": window, "scale": 0.25}
    ref = forward_and_grads(per_sequence, q, k, v, lengths=LENGTHS, **options)
    out = forward_and_grads(
        attention, q, k, v, cu_seqlens=cu_seqlens_from_lengths(LENGTHS), **options
    )
    assert_same_attention("varlen", ref, out)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=5),
    window=st.integers(1, 25),
    block_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_windowed_varlen_property(lengths, window, block_size, seed):
    """Any packing (empty sequences too), window and block size equals the sequences alone."""
    q, k, v = make_qkv(1, sum(lengths), 2, 1, 3, seed=seed)
    options = {"causal": True, "window": window, "scale": 0.5}
    o = attention_torch(
        q, k, v, **options, cu_seqlens=cu_seqlens_from_lengths(lengths), block_size=block_size
    )
    assert_close("o", per_sequence(q, k, v, lengths, **options), o, F64)


# ---- decode with a KV cache -------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4], ids=["full-cache", "window4-ring"])
def test_prefill_then_step_equals_full_forward(window):
    """A ragged batch (prompts of 2, 12 and 9 tokens, right-padded to 12) decoded 7 tokens:
    every step equals full attention over that sequence's tokens so far. With window 4 the
    ring starts short (2 < 4) for one sequence and wraps for the others."""
    B, H, Hkv, D, T, steps = 3, 4, 2, 8, 12, 7
    lengths = [2, 12, 9]
    q, k, v = make_qkv(B, T + steps, H, Hkv, D, seed=19)
    options = {"causal": True, "window": window, "scale": D**-0.5}

    o_prompt = attention(q[:, :T], k[:, :T], v[:, :T], window=window)
    padding = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    # Padding may hold anything, NaN included; the cache must never read it.
    k_prompt = k[:, :T].masked_fill(padding[:, :, None, None], float("nan"))
    v_prompt = v[:, :T].masked_fill(padding[:, :, None, None], float("nan"))
    if window is None:
        cache = KVCache(B, max(lengths) + steps, Hkv, D, dtype=torch.float64)
    else:
        cache = SlidingWindowCache(B, window, Hkv, D, dtype=torch.float64)
    cache.prefill(k_prompt, v_prompt, lengths=lengths)

    decoded = [attention_step(q[:, T + s], cache, k[:, T + s], v[:, T + s]) for s in range(steps)]
    for b, n in enumerate(lengths):
        tokens = torch.cat([torch.arange(n), torch.arange(T, T + steps)])
        o_ref = attention_ref(
            q[b : b + 1, tokens], k[b : b + 1, tokens], v[b : b + 1, tokens], **options
        )
        assert_close(f"prompt {b}", o_ref[0, :n], o_prompt[b, :n], F64)
        assert_close(f"decode {b}", o_ref[0, n:], torch.stack([o[b] for o in decoded]), F64)
    assert cache.lengths.tolist() == [n + steps for n in lengths]


def test_sliding_window_cache_prefill_keeps_the_last_window_tokens():
    k = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(2, 10, 1, 1)
    cache = SlidingWindowCache(2, 4, 1, 1)
    cache.prefill(k, k, lengths=[10, 3])
    # Token t sits at slot t % 4; sequence 1 holds tokens 0..2 and an empty (zero) slot.
    assert cache.k[0, :, 0, 0].tolist() == [8.0, 9.0, 6.0, 7.0]
    assert cache.k[1, :, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0]
    cache.append(torch.full((2, 1, 1), 10.0), torch.full((2, 1, 1), 10.0))
    assert cache.k[0, :, 0, 0].tolist() == [8.0, 9.0, 10.0, 7.0]
    assert cache.k[1, :, 0, 0].tolist() == [0.0, 1.0, 2.0, 10.0]


def test_step_computes_in_fp32_and_returns_q_dtype():
    q, k, v = make_qkv(2, 6, 4, 2, 8, seed=21)
    cache = KVCache(2, 6, 2, 8)
    cache.prefill(k[:, :5].float(), v[:, :5].float())
    o = attention_step(q[:, 5].half(), cache, k[:, 5].half(), v[:, 5].half())
    o_ref = attention_ref(q, k, v, causal=True, window=None, scale=8**-0.5)[:, 5]
    assert o.dtype == torch.float16
    assert_close("o", o_ref, o, 2e-3)


# ---- backend dispatch -------------------------------------------------------------------------


@pytest.mark.cpu
def test_auto_backend_on_cpu_uses_the_torch_path(monkeypatch):
    calls = []

    def fake(q, k, v, **options):
        calls.append(options)
        return q

    monkeypatch.setattr(attention_module, "attention_torch", fake)
    attention(*make_qkv(1, 4, 2, 1, 8, seed=0, dtype=torch.float32), window=2)
    assert calls == [{"causal": True, "window": 2, "scale": 8**-0.5, "cu_seqlens": None}]


def test_triton_backend_gets_checked_contiguous_tensors(monkeypatch):
    calls = []

    def fake_triton(q, k, v, **options):
        calls.append(([t.is_contiguous() for t in (q, k, v)], options))
        return q

    module = types.ModuleType("memzoo.kernels.attention.triton")
    module.attention_triton = fake_triton
    monkeypatch.setitem(sys.modules, "memzoo.kernels.attention.triton", module)
    q, k, v = make_qkv(1, 10, 4, 2, 8, seed=0, dtype=torch.float32)
    cu = cu_seqlens_from_lengths([3, 7])
    attention(
        q.transpose(1, 2).contiguous().transpose(1, 2),
        k,
        v,
        window=5,
        scale=2,
        cu_seqlens=cu,
        backend="triton",
    )
    ((contiguous, options),) = calls
    assert contiguous == [True, True, True]
    assert options["window"] == 5 and options["causal"] is True
    assert isinstance(options["scale"], float) and options["scale"] == 2.0
    assert torch.equal(options["cu_seqlens"], cu)


@pytest.mark.parametrize("window,window_size", [(None, (-1, -1)), (1, (0, 0)), (64, (63, 0))])
def test_flash_attn_gets_its_window_convention(monkeypatch, window, window_size):
    """flash-attn counts the keys left of the query: window w is window_size=(w - 1, 0)."""
    calls = []

    def flash_attn_func(q, k, v, **kwargs):
        calls.append(("dense", kwargs))
        return q

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(("varlen", (max_q, max_k), kwargs))
        return q

    monkeypatch.setattr(
        attention_module, "_flash_attn_functions", lambda: (flash_attn_func, flash_attn_varlen_func)
    )
    q, k, v = make_qkv(1, 10, 2, 2, 8, seed=0, dtype=torch.float16)
    expected = {"softmax_scale": 0.5, "causal": True, "window_size": window_size}
    options = {"causal": True, "window": window, "scale": 0.5}
    o = attention_module._attention_flash(q, k, v, **options, cu_seqlens=None)
    assert o.shape == q.shape and calls.pop() == ("dense", expected)
    cu = cu_seqlens_from_lengths([3, 7])
    o = attention_module._attention_flash(q, k, v, **options, cu_seqlens=cu)
    assert o.shape == q.shape and calls.pop() == ("varlen", (7, 7), expected)


# ---- bad input ----------------------------------------------------------------------------------


def _good():
    return {
        "q": torch.zeros(1, 8, 4, 4),
        "k": torch.zeros(1, 8, 2, 4),
        "v": torch.zeros(1, 8, 2, 4),
    }


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"q": torch.zeros(1, 8, 3, 4)}, ValueError, r"H=3 must be a multiple of .* Hkv=2"),
        (
            {"k": torch.zeros(1, 8, 2, 5)},
            ValueError,
            r"k must have shape \[B=1, T=8, Hkv=2, D=4\] \(D=4 from q\)",
        ),
        ({"v": torch.zeros(1, 8, 2, 6)}, ValueError, r"v must have shape \[B=1, T=8, Hkv=2, D=4\]"),
        ({"k": torch.zeros(1, 7, 2, 4)}, ValueError, r"k must have shape \[B=1, T=8, Hkv, D=4\]"),
        ({"q": torch.zeros(8, 4, 4)}, ValueError, r"q must have 4 dims \[B, T, H, D\]"),
        ({"k": torch.zeros(1, 8, 2, 4, dtype=torch.float64)}, TypeError, "k must have q's dtype"),
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"window": -3}, ValueError, "window must be >= 1"),
        ({"window": 2.0}, TypeError, "window must be an int"),
        ({"window": True}, TypeError, "window must be an int"),
        ({"window": 4, "causal": False}, ValueError, "window=4 needs causal=True"),
        (
            {"cu_seqlens": torch.tensor([0, 8], dtype=torch.int64)},
            TypeError,
            "cu_seqlens must have dtype int32",
        ),
        *bad_cu_seqlens_values(8),
        (
            {
                "q": torch.zeros(2, 8, 4, 4),
                "k": torch.zeros(2, 8, 2, 4),
                "v": torch.zeros(2, 8, 2, 4),
                "cu_seqlens": torch.tensor([0, 8], dtype=torch.int32),
            },
            ValueError,
            "batch size must be 1",
        ),
        ({"backend": "fast"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises_clearly(kwargs, error, match):
    args = {**_good(), **kwargs}
    with pytest.raises(error, match=match):
        attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_full_cache_raises_and_stays_intact():
    cache = KVCache(2, 3, 1, 4)
    cache.prefill(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4), lengths=[3, 1])
    with pytest.raises(ValueError, match="cache is full.*max_len=3"):
        attention_step(torch.zeros(2, 2, 4), cache, torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    assert cache.lengths.tolist() == [3, 1]


@pytest.mark.parametrize(
    "shapes,error,match",
    [
        (
            {"q": (2, 4, 5)},
            ValueError,
            r"q must have shape \[B=2, H=4, D=4\] \(D=4 from the cache\)",
        ),
        ({"q": (3, 4, 4)}, ValueError, r"q must have shape \[B=2, H, D=4\] \(B=2 from the cache\)"),
        ({"q": (2, 3, 4)}, ValueError, r"H=3 must be a multiple of the cache's kv heads Hkv=2"),
        ({"k_new": (2, 1, 4)}, ValueError, r"k_new must have shape \[B=2, Hkv=2, D=4\]"),
        ({"v_new": (2, 2, 4, 1)}, ValueError, r"v_new must have 3 dims \[B, Hkv, D\]"),
    ],
)
def test_step_rejects_wrong_shapes_before_touching_the_cache(shapes, error, match):
    cache = SlidingWindowCache(2, 4, 2, 4)
    args = {"q": (2, 4, 4), "k_new": (2, 2, 4), "v_new": (2, 2, 4), **shapes}
    with pytest.raises(error, match=match):
        attention_step(
            torch.zeros(args["q"]), cache, torch.zeros(args["k_new"]), torch.zeros(args["v_new"])
        )
    assert cache.lengths.tolist() == [0, 0]


def test_step_rejects_a_foreign_cache():
    with pytest.raises(TypeError, match="cache must be a KVCache or SlidingWindowCache"):
        attention_step(
            torch.zeros(1, 2, 4), {"k": None}, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
        )


@pytest.mark.parametrize(
    "lengths,match",
    [
        ([1, 9], r"lengths must lie in \[0, T=4\]"),
        ([1], "lengths must hold B=2 values"),
        ([1.5, 2], r"lengths must lie in \[0, T=4\]"),
    ],
)
def test_prefill_rejects_bad_lengths(lengths, match):
    cache = KVCache(2, 8, 1, 4)
    with pytest.raises(ValueError, match=match):
        cache.prefill(torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4), lengths=lengths)


def test_prefill_longer_than_the_cache_raises():
    cache = KVCache(1, 3, 1, 4)
    with pytest.raises(ValueError, match="prompt of 4 tokens does not fit a cache of max_len=3"):
        cache.prefill(torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4))
