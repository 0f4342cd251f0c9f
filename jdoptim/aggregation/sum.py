"""Sum: the ordinary gradient of the summed loss."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting


class SumWeighting(Weighting):
    """``w = [1, ..., 1]``."""

    differentiable = True

    requires_values = False
    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


class Sum(GramianWeightedAggregator):
    """Sums the rows of the Jacobian."""

    def __init__(self) -> None:
        super().__init__(SumWeighting())

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.sum(dim=0)
