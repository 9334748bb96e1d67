"""Softmax attention, causal or full, with an optional sliding window; KV-cache decode.

Query i of a sequence attends to key j when
    causal=False:             any j
    causal=True:              j <= i
    causal=True, window=w:    i - w < j <= i     (the w most recent tokens, i included;
                                                 flash-attn's window_size=(w - 1, 0))
and o_i = sum_j softmax_j(scale q_i . k_j) v_j. Query head h reads kv head h // (H // Hkv).
"""

from __future__ import annotations

import functools

import torch

from memzoo.kernels._core import InputCheck, register_op, resolve_backend
from memzoo.kernels.attention.cache import KVCache, SlidingWindowCache, attention_step
from memzoo.kernels.attention.reference import attention_torch

__all__ = ["KVCache", "SlidingWindowCache", "attention", "attention_step"]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def check_window(op: str, window, causal: bool) -> int | None:
    """Validate `window`: None, or an int >= 1 together with causal=True."""
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool):
        raise TypeError(f"{op}: window must be an int >= 1 or None, got {window!r}")
    if window < 1:
        raise ValueError(
            f"{op}: window must be >= 1 (the number of tokens a query sees, itself included), "
            f"got {window}"
        )
    if not causal:
        raise ValueError(f"{op}: window={window} needs causal=True (sliding windows look back)")
    return window


@functools.cache
def _flash_attn_functions():
    """(flash_attn_func, flash_attn_varlen_func), or None when flash-attn is not usable."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception:  # ImportError, or a build for another torch/CUDA failing to load
        return None
    return flash_attn_func, flash_attn_varlen_func


def _flash_attn_fits(q: torch.Tensor) -> bool:
    """flash-attn 2 runs fp16/bf16 with D <= 256 on Ampere or newer."""
    return (
        q.dtype in _FLASH_DTYPES
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device)[0] >= 8
        and _flash_attn_functions() is not None
    )


def _attention_flash(q, k, v, *, causal, window, scale, cu_seqlens):
    flash_attn_func, flash_attn_varlen_func = _flash_attn_functions()
    window_size = (-1, -1) if window is None else (window - 1, 0)
    common = {"softmax_scale": scale, "causal": causal, "window_size": window_size}
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, **common)
    # flash-attn sizes its grid by the longest sequence: one host sync.
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    o = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, longest, longest, **common)
    return o.unsqueeze(0)


@register_op("torch", "triton")
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention, causal by default, optionally over a sliding window.

    Args:
        q: `[B, T, H, D]`.
        k, v: `[B, T, Hkv, D]` with H a multiple of Hkv (grouped-query attention: query head
            h reads kv head h // (H // Hkv)); same dtype as q.
        causal: query i sees keys j <= i; False: every key.
        window: int w >= 1 (needs causal=True): query i sees keys i - w < j <= i, the w most
            recent tokens including itself (flash-attn's window_size=(w - 1, 0)). w >= T is
            full causal attention. None: no window.
        scale: multiplies q . k; default D^-1/2.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (then B must be 1),
            shared by q, k and v; no token attends across a boundary.
        backend: "auto", "torch" or "triton". auto on CUDA uses flash-attn when it is
            installed and the inputs are fp16/bf16, else the Triton kernels; on CPU the
            torch path (scaled_dot_product_attention, or blocked local attention with memory
            O(T (w + block)) for a window).

    Returns:
        o `[B, T, H, D]` in q's dtype (accumulated in fp32; fp64 for fp64 on the torch path).

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes, devices, head
        counts, windows or cu_seqlens; BackendUnavailableError when `backend` cannot run here.

    Example (Mistral-style sliding window over two packed sequences of 100 and 28 tokens)::

        cu = torch.tensor([0, 100, 128], dtype=torch.int32)
        o = attention(q, k, v, window=64, cu_seqlens=cu)   # q: [1, 128, 8, 64]
    """
    check = InputCheck("attention")
    q = check.tensor("q", q, "B T H D")
    k = check.tensor("k", k, "B T Hkv D")
    v = check.tensor("v", v, "B T Hkv D")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    B, T, H, Hkv = (check.sizes[n] for n in ("B", "T", "H", "Hkv"))
    if H % Hkv:
        raise check.error(
            f"q's heads H={H} must be a multiple of k's and v's heads Hkv={Hkv} "
            "(grouped-query attention)"
        )
    window = check_window("attention", window, causal)
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    scale = check.sizes["D"] ** -0.5 if scale is None else float(scale)
    options = {"causal": causal, "window": window, "scale": scale, "cu_seqlens": cu_seqlens}

    requested = backend
    backend = resolve_backend("attention", backend, q.device, q.dtype)
    if backend == "triton":
        if requested == "auto" and _flash_attn_fits(q):
            return _attention_flash(q, k, v, **options)
        from memzoo.kernels.attention.triton import attention_triton

        return attention_triton(q, k, v, **options)
    return attention_torch(q, k, v, **options)
