"""Sum: the sum of the losses."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._bases import Scalarizer


class Sum(Scalarizer):
    """``Σᵢ Lᵢ`` over all entries of the losses."""

    def forward(self, values: Tensor, /) -> Tensor:
        return values.sum()
