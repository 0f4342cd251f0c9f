"""Mean: the ordinary gradient of the average loss."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting


class MeanWeighting(Weighting):
    """``w = [1/m, ..., 1/m]``: Jacobian descent with this weighting is plain gradient descent."""

    differentiable = True

    requires_values = False
    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        return torch.full((rows,), 1.0 / rows, dtype=gramian.dtype, device=gramian.device)


class Mean(GramianWeightedAggregator):
    """Averages the rows of the Jacobian."""

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.mean(dim=0)
