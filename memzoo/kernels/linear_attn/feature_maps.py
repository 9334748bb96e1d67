"""Feature maps phi for linear attention, applied to q and k over their last dim d.

- "identity": phi(x) = x                                            size d
- "elu":      phi(x) = elu(x) + 1 (positive, Katharopoulos et al.)  size d
- "relu":     phi(x) = relu(x)                                      size d
- "taylor":   BASED's second-order Taylor expansion of exp(q·k / sqrt(d)),
              phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]      size 1 + d + d^2
              so that phi(q)·phi(k) = 1 + q·k / sqrt(d) + (q·k)^2 / (2 d).
- "taylor_compressed": the same dot products from the symmetric second-order part only:
              diagonal x_i^2 / (sqrt(2) sqrt(d)), pairs i < j x_i x_j / sqrt(d)
              size 1 + d + d (d + 1) / 2 (153 for d = 16).

Each map is an object with `name`, `__call__(x) -> [..., output_size(d)]` and
`output_size(d)`; it keeps x's dtype and is differentiable.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["FEATURE_MAPS", "FeatureMap", "get_feature_map"]


class FeatureMap:
    """An elementwise feature map: phi(x) has the size of x."""

    name = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_size(self, d: int) -> int:
        return d

    def __repr__(self) -> str:
        return f"FeatureMap({self.name!r})"


class _Identity(FeatureMap):
    name = "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _EluPlusOne(FeatureMap):
    name = "elu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # elu(x) + 1 = exp(x) for x <= 0, without rounding exp(x) - 1 + 1 to 0 (fp32, x < -17).
        # The clamp keeps the unused branch finite, so its zero gradient is not 0 * inf.
        return torch.where(x > 0, x + 1, x.clamp(max=0).exp())


class _Relu(FeatureMap):
    name = "relu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def _taylor_head(x: torch.Tensor) -> list[torch.Tensor]:
    """The order-0 and order-1 parts: [1, x / d^(1/4)]."""
    d = x.shape[-1]
    return [x.new_ones(*x.shape[:-1], 1), x * d**-0.25]


class _Taylor(FeatureMap):
    name = "taylor"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        second = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
        return torch.cat([*_taylor_head(x), second], dim=-1)

    def output_size(self, d: int) -> int:
        return 1 + d + d * d


@functools.cache
def _upper_pairs(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices i <= j of the upper triangle and their weights (diagonal / off-diagonal)."""
    i, j = torch.triu_indices(d, d, device=device)
    # Off the diagonal x_i x_j stands for both (i, j) and (j, i) of vec(x x^T): sqrt(2) times
    # the diagonal weight keeps every dot product.
    weight = torch.full(i.shape, 1 / math.sqrt(d), dtype=torch.float64, device=device)
    weight[i == j] = 1 / math.sqrt(2 * d)
    return i, j, weight


class _TaylorCompressed(FeatureMap):
    name = "taylor_compressed"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        i, j, weight = _upper_pairs(x.shape[-1], x.device)
        second = x[..., i] * x[..., j] * weight.to(x.dtype)
        return torch.cat([*_taylor_head(x), second], dim=-1)

    def output_size(self, d: int) -> int:
        return 1 + d + d * (d + 1) // 2


FEATURE_MAPS: dict[str, FeatureMap] = {
    fm.name: fm for fm in (_Identity(), _EluPlusOne(), _Relu(), _Taylor(), _TaylorCompressed())
}


def get_feature_map(name: str) -> FeatureMap:
    """The feature map called `name`; ValueError listing the valid names otherwise."""
    try:
        return FEATURE_MAPS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown feature map {name!r}; choose one of {sorted(FEATURE_MAPS)}"
        ) from None
