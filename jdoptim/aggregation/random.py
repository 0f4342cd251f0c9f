"""Random: random loss weighting (RLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting


class RandomWeighting(Weighting):
    """``w = softmax(z)`` with ``z ~ N(0, I)`` drawn anew at each call.

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning* (TMLR 2022). Draws from torch's global generator, so ``torch.manual_seed`` makes it
    reproducible.
    """

    differentiable = True

    requires_values = False
    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        logits = torch.randn(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        return torch.softmax(logits, dim=0)


class Random(GramianWeightedAggregator):
    """Combines the rows with :class:`RandomWeighting` weights."""

    def __init__(self) -> None:
        super().__init__(RandomWeighting())
