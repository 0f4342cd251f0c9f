"""Random: random loss weighting (RLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.scalarization._bases import Scalarizer


class Random(Scalarizer):
    """``Σᵢ wᵢ Lᵢ`` with ``w = softmax(z)``, ``z ~ N(0, I)`` drawn anew at each call.

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning* (TMLR 2022), Algorithm 2. The softmax runs over all entries of the losses, so the
    weights are positive and sum to one. Draws from torch's global generator: ``torch.manual_seed``
    makes it reproducible.
    """

    def forward(self, values: Tensor, /) -> Tensor:
        logits = torch.randn(values.numel(), dtype=values.dtype, device=values.device)
        weights = torch.softmax(logits, dim=0).reshape(values.shape)
        return (weights * values).sum()
