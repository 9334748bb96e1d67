"""The non-causal state of a JRT-RNN encoder prefix, the initial state of linear attention."""

from __future__ import annotations

import torch

from memzoo.kernels._core import InputCheck, register_op

__all__ = ["prefix_state"]

# At most this many per-token outer products k_j^T v_j exist at once in the packed reduction.
_BLOCK_ELEMENTS = 1 << 22


@register_op("torch")
def prefix_state(
    k_enc: torch.Tensor,
    v_enc: torch.Tensor,
    *,
    normalize: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sum an encoder prefix into a linear-attention state: S = sum_j k_j^T v_j (, z = sum_j k_j).

    JRT-RNN reads its first M tokens non-causally through their own projections k^e, v^e:

        y_i = phi(q_i)·[sum_{j<=i} phi(k_j)^T v_j + sum_{j<M} phi(k^e_j)^T v^e_j]
              / (phi(q_i)·[sum_{j<=i} phi(k_j) + sum_{j<M} phi(k^e_j)] + eps)

    which is `linear_attn(q, k, v, normalize=True, initial_state=prefix_state(k_e, v_e,
    normalize=True))` with phi applied to q, k and k_e beforehand (and scale=1, the default
    with `normalize`). Without `normalize` the state is S alone.

    Args:
        k_enc: `[B, M, H, K]` feature-mapped encoder keys phi(k^e).
        v_enc: `[B, M, H, V]` encoder values.
        normalize: also return the normaliser z.
        cu_seqlens: int32 `[N + 1]` offsets of prefixes packed along M (then B must be 1);
            an empty prefix gives a zero state. Reduced without host syncs.

    Returns:
        S `[N, H, K, V]`, or (S, z `[N, H, K]`) with `normalize`, in fp32 (fp64 for fp64
        inputs). N is B, or the number of packed prefixes.

    Raises:
        ValueError / TypeError naming the argument for wrong shapes, dtypes, devices or
        cu_seqlens.
    """
    check = InputCheck("prefix_state")
    k_enc = check.tensor("k_enc", k_enc, "B M H K")
    v_enc = check.tensor("v_enc", v_enc, "B M H V")
    B, M, H = check.sizes["B"], check.sizes["M"], check.sizes["H"]
    K, V = check.sizes["K"], check.sizes["V"]
    if cu_seqlens is not None:
        cu_seqlens = check.cu_seqlens(cu_seqlens, total=M, batch=B, length_name="M")
    f64 = torch.float64 in (k_enc.dtype, v_enc.dtype)
    dtype = torch.float64 if f64 else torch.float32
    k, v = k_enc.to(dtype), v_enc.to(dtype)

    if cu_seqlens is None:
        S = torch.einsum("bmhk,bmhv->bhkv", k, v)
        return (S, k.sum(1)) if normalize else S

    k, v = k[0], v[0]
    positions = torch.arange(M, device=k.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:], positions, right=True)  # prefix of each token
    S = k.new_zeros(cu_seqlens.numel() - 1, H, K, V)
    # Token blocks bound the outer products held at once; M is a shape, so no host sync.
    block = max(1, _BLOCK_ELEMENTS // max(1, H * K * V))
    for start in range(0, M, block):
        end = min(M, start + block)
        outer = k[start:end, :, :, None] * v[start:end, :, None, :]
        S = S.index_add(0, seq[start:end], outer)
    if not normalize:
        return S
    return S, k.new_zeros(S.shape[:3]).index_add(0, seq, k)
