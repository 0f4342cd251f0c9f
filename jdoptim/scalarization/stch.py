"""STCH: smooth Tchebycheff scalarisation."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.scalarization._bases import (
    PreferenceScalarizer,
    check_number,
    numbers_table,
)


class STCH(PreferenceScalarizer):
    """``μ log Σᵢ exp(λᵢ (Lᵢ - zᵢ*) / μ)``: a smooth upper bound of ``maxᵢ λᵢ (Lᵢ - zᵢ*)``.

    Lin et al., *Smooth Tchebycheff Scalarization for Multi-Objective Optimization* (ICML 2024).
    The bound is within ``μ log m`` of the weighted maximum and tightens as ``μ → 0``.

    Args:
        mu: smoothing parameter ``μ > 0`` (the paper tries 0.01 to 1).
        weights: preference ``λ`` (non-negative, shape of the losses); ``None``: uniform ``1/m``.
        reference: ideal point ``z*`` (shape of the losses); ``None``: no shift.
    """

    hyper_parameters = numbers_table(mu=True)

    def __init__(
        self, mu: float, weights: Tensor | None = None, reference: Tensor | None = None
    ) -> None:
        super().__init__(weights, reference)
        self.mu = check_number(mu, "mu", positive=True)

    def forward(self, values: Tensor, /) -> Tensor:
        shifted = self._shifted(values)
        if self.weights is None:
            weighted = shifted / values.numel()
        else:
            weighted = self._matched(self.weights, values, "weights") * shifted
        # μ log Σ exp(x/μ) = max x + μ log Σ exp((x - max x)/μ): x/μ alone overflows for small μ.
        flat = weighted.flatten()
        largest = flat.detach().max()
        return largest + self.mu * torch.logsumexp((flat - largest) / self.mu, dim=0)

    def _repr_args(self) -> str:
        return (
            f"mu={self.mu:g}, weights={tensor_repr(self.weights)}, "
            f"reference={tensor_repr(self.reference)}"
        )
