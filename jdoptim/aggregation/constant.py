"""Constant: a fixed linear scalarisation of the objectives."""

from __future__ import annotations

from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import validators
from jdoptim.linalg import check_finite, check_tensor


def _checked_weights(weights: Tensor) -> Tensor:
    check_tensor(weights, "weights")
    if weights.ndim != 1 or weights.numel() == 0:
        raise ValueError(
            f"weights must be a non-empty 1-D tensor, got shape {tuple(weights.shape)}."
        )
    check_finite(weights, "weights")
    return weights.detach().clone()


class ConstantWeighting(Weighting):
    """Always returns the given weights (one per objective)."""

    differentiable = True

    requires_values = False
    scale_invariant = True
    weights: Tensor

    hyper_parameters = validators(
        weights=_checked_weights,
    )

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", _checked_weights(weights), persistent=False)

    def forward(self, gramian: Tensor, /) -> Tensor:
        weights = self.weights
        if weights.shape[0] != gramian.shape[0]:
            raise ValueError(
                f"ConstantWeighting holds {weights.shape[0]} weights but there are "
                f"{gramian.shape[0]} objectives."
            )
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def _repr_args(self) -> str:
        return f"weights={tensor_repr(self.weights)}"


class Constant(GramianWeightedAggregator):
    """``d = wᵀ J`` for fixed weights ``w``."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))
