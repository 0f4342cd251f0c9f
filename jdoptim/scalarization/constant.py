"""Constant: a fixed linear scalarisation of the losses."""

from __future__ import annotations

from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.scalarization._bases import PreferenceScalarizer


class Constant(PreferenceScalarizer):
    """``Σᵢ wᵢ Lᵢ`` for fixed weights ``w`` of the losses' shape (any finite values)."""

    weights_are_preference = False

    def __init__(self, weights: Tensor) -> None:
        if weights is None:
            raise TypeError("Constant needs weights: a tensor with one weight per loss.")
        super().__init__(weights)

    def forward(self, values: Tensor, /) -> Tensor:
        weights = self.weights
        if weights is None:
            raise TypeError("Constant needs weights: a tensor with one weight per loss.")
        return (self._matched(weights, values, "weights") * values).sum()

    def _repr_args(self) -> str:
        return f"weights={tensor_repr(self.weights)}"
