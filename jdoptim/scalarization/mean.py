"""Mean: the average of the losses."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._bases import Scalarizer


class Mean(Scalarizer):
    """``(1/m) Σᵢ Lᵢ`` over all ``m`` entries of the losses."""

    averages_losses = True

    def forward(self, values: Tensor, /) -> Tensor:
        return values.mean()
