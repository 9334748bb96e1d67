"""Causal depthwise conv1d (the short convolution of Mamba, BASED and friends), with decode step."""

from __future__ import annotations

import torch

from memzoo.kernels._core import InputCheck, check_choice, register_op, resolve_backend
from memzoo.kernels.conv1d.reference import conv1d_dense_ref, conv1d_shift_ref, conv1d_update_ref

ACTIVATIONS = (None, "silu", "swish")
MIN_WIDTH, MAX_WIDTH = 2, 8

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def _check_common(check: InputCheck, weight, bias, activation):
    weight = check.tensor("weight", weight, "D W")
    W = check.sizes["W"]
    if not MIN_WIDTH <= W <= MAX_WIDTH:
        raise check.error(
            f"weight width W must be in {MIN_WIDTH}..{MAX_WIDTH}, got weight shape "
            f"{tuple(weight.shape)}"
        )
    bias = check.optional("bias", bias, "D")
    check_choice(check.op, "activation", activation, ACTIVATIONS)
    check.sizes["S"], check.origin["S"] = W - 1, "= W - 1 from weight"
    return weight, bias, None if activation is None else "silu"


@register_op("torch", "triton")
def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise 1-D convolution over time, optionally followed by SiLU.

    y[b, t, d] = act(bias[d] + sum_w weight[d, w] * x[b, t - (W - 1) + w, d]), where inputs
    before a sequence's start are taken from its state (zeros if none).

    Args:
        x: `[B, T, D]` (time-major; mamba-ssm's causal_conv1d takes `[B, D, T]`).
        weight: `[D, W]` with 2 <= W <= 8 (nn.Conv1d's `[D, 1, W]` squeezed).
        bias: `[D]` or None.
        activation: None, "silu" (or its alias "swish").
        initial_state: `[N, D, W - 1]`, the W - 1 inputs preceding each sequence, oldest first.
        output_final_state: also return the last W - 1 inputs of each sequence.
        cu_seqlens: int32 `[N + 1]` offsets of sequences packed along T (then B must be 1);
            the convolution never crosses a boundary.
        backend: "auto", "torch", "triton" or "cuda" (see memzoo.kernels._core.resolve_backend).

    Returns:
        y `[B, T, D]` in x's dtype, and the final state `[N, D, W - 1]` in fp32 (None unless
        asked). N is B, or the number of packed sequences.

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes, devices,
        widths or cu_seqlens; BackendUnavailableError when `backend` cannot run here.

    Example (two sequences of lengths 3 and 5 packed together)::

        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        y, state = causal_conv1d(x_packed, w, cu_seqlens=cu, output_final_state=True)
        # x_packed: [1, 8, D]; state: [2, D, W - 1]
    """
    check = InputCheck("causal_conv1d")
    x = check.tensor("x", x, "B T D")
    weight, bias, activation = _check_common(check, weight, bias, activation)
    B, T = check.sizes["B"], check.sizes["T"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=T, batch=B)
    check.sizes["N"] = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check.origin["N"] = "the number of sequences"
    initial_state = check.optional("initial_state", initial_state, "N D S")

    backend = resolve_backend("causal_conv1d", backend, x.device, x.dtype)
    if backend == "triton":
        from memzoo.kernels.conv1d.triton import causal_conv1d_triton

        return causal_conv1d_triton(
            x, weight, bias, activation, initial_state, output_final_state, cu_seqlens
        )
    if cu_seqlens is None:
        return conv1d_dense_ref(x, weight, bias, activation, initial_state, output_final_state)
    return conv1d_shift_ref(
        x, weight, bias, activation, initial_state, output_final_state, cu_seqlens
    )


@register_op("torch", "triton")
def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of `causal_conv1d`.

    Args:
        x: `[B, D]`, the new token.
        conv_state: `[B, D, W - 1]`, the previous W - 1 inputs, oldest first (e.g. the final
            state of a prefill).
        weight, bias, activation, backend: as in `causal_conv1d`.

    Returns:
        y `[B, D]` in x's dtype and the new state `[B, D, W - 1]` in fp32 (a new tensor; the
        given state is not modified).
    """
    check = InputCheck("causal_conv1d_update")
    x = check.tensor("x", x, "B D")
    weight, bias, activation = _check_common(check, weight, bias, activation)
    conv_state = check.tensor("conv_state", conv_state, "B D S")

    backend = resolve_backend("causal_conv1d_update", backend, x.device, x.dtype)
    if backend == "triton":
        from memzoo.kernels.conv1d.triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return conv1d_update_ref(x, conv_state, weight, bias, activation)
