"""COSMOS: linear scalarisation with a cosine-similarity reward."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.scalarization._bases import (
    PreferenceScalarizer,
    check_number,
    numbers_table,
)


class COSMOS(PreferenceScalarizer):
    """``rᵀL - λ cos(r, L) = rᵀL - λ rᵀL / (‖r‖ ‖L‖)``.

    Ruchte & Grabocka, *Scalable Pareto Front Approximation for Deep Multi-Objective Learning*
    (ICDM 2021). The cosine term pulls the vector of losses towards the preference ray,
    which spreads the solutions over the Pareto front. Only the objective is implemented here: the
    paper also feeds ``r`` to the model, and resamples ``r ~ Dirichlet`` at every step
    (``cosmos.weights = torch.distributions.Dirichlet(torch.ones(m)).sample()``).

    Args:
        lambda_: weight ``λ ≥ 0`` of the cosine term (0: plain linear scalarisation).
        weights: preference ``r`` (non-negative, shape of the losses).
    """

    hyper_parameters = numbers_table(lambda_=False)

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        if weights is None:
            raise TypeError("COSMOS needs weights: a preference tensor with one entry per loss.")
        super().__init__(weights)
        self.lambda_ = check_number(lambda_, "lambda_", positive=False)

    def forward(self, values: Tensor, /) -> Tensor:
        if self.weights is None:
            raise TypeError("COSMOS needs weights: a preference tensor with one entry per loss.")
        preference = self._matched(self.weights, values, "weights")
        linear = (preference * values).sum()
        norms = preference.norm() * values.norm()
        # All-zero losses have no direction: their cosine term is 0 (and so is its gradient).
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        cosine = torch.where(norms > 0, linear / safe_norms, torch.zeros_like(linear))
        return linear - self.lambda_ * cosine

    def _repr_args(self) -> str:
        return f"lambda_={self.lambda_:g}, weights={tensor_repr(self.weights)}"
