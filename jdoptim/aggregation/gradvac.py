"""GradVac: Gradient Vaccine, pairwise cosine similarities pulled toward their moving averages."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._state_rows import check_state_rows


class GradVacWeighting(Stateful, Weighting):
    r"""Stateful weights of GradVac, computed from the Gramian alone.

    Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models* (ICLR 2021), Algorithm 1. For each objective
    ``i`` and each other objective ``j`` (in a random order drawn with ``torch.randperm``), with
    ``φ = cos(gᵢ', gⱼ)`` for the current corrected row ``gᵢ'`` and the target ``φ̂ᵢⱼ``:

    * if ``φ < φ̂ᵢⱼ``: ``gᵢ' += ‖gᵢ'‖ (φ̂ᵢⱼ √(1-φ²) - φ √(1-φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1-φ̂ᵢⱼ²)) · gⱼ``,
      which raises the cosine to exactly ``φ̂ᵢⱼ`` (eq. 5);
    * always: ``φ̂ᵢⱼ ← (1-β) φ̂ᵢⱼ + β φ`` (eq. 6, targets start at 0).

    The direction is ``Σᵢ gᵢ'``. Writing ``gᵢ' = Σₖ Cᵢₖ gₖ``, norms and cosines are quadratic forms
    in ``G``, so the weights ``w = 1ᵀC`` need only the Gramian (the aggregator :class:`GradVac`
    returns ``wᵀJ``). ``eps`` is added to the denominators.

    Args:
        beta: EMA rate ``β ∈ [0, 1]`` of the targets.
        eps: non-negative constant added to denominators.

    State: the ``[m, m]`` targets ``φ̂``; :meth:`reset` sets them back to 0.
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}.")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}.")
        self.beta = beta
        self.eps = eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        previous = self._state.get("targets")
        if previous is None:
            targets = gramian.new_zeros(rows, rows)
        else:
            check_state_rows(self, previous, rows)
            targets = previous.to(gramian).clone()
        gram = gramian.detach().to(torch.float64).cpu().tolist()
        target_list = targets.to(torch.float64).cpu().tolist()
        norms = [math.sqrt(max(gram[k][k], 0.0)) for k in range(rows)]
        coefficients = [[float(k == i) for k in range(rows)] for i in range(rows)]
        for i in range(rows):
            coefs = coefficients[i]
            # Dot products of the corrected row i with every original row: (c G)_j.
            dots = [sum(coefs[k] * gram[k][j] for k in range(rows)) for j in range(rows)]
            for j in _others_in_random_order(i, rows):
                norm_i = math.sqrt(max(sum(coefs[k] * dots[k] for k in range(rows)), 0.0))
                cosine = dots[j] / (norm_i * norms[j] + self.eps)
                target = target_list[i][j]
                if cosine < target:
                    sine, target_sine = _sine(cosine), _sine(target)
                    step = (
                        norm_i
                        * (target * sine - cosine * target_sine)
                        / (norms[j] * target_sine + self.eps)
                    )
                    coefs[j] += step
                    dots = [dots[k] + step * gram[j][k] for k in range(rows)]
                target_list[i][j] = (1 - self.beta) * target + self.beta * cosine
        self._state["targets"] = torch.tensor(
            target_list, dtype=gramian.dtype, device=gramian.device
        )
        weights = torch.tensor(coefficients, dtype=torch.float64).sum(dim=0)
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def _repr_args(self) -> str:
        return f"beta={self.beta}, eps={self.eps}"


def _sine(cosine: float) -> float:
    return math.sqrt(max(1.0 - cosine * cosine, 0.0))


def _others_in_random_order(index: int, rows: int) -> list[int]:
    others = [k for k in range(rows) if k != index]
    return [others[k] for k in torch.randperm(rows - 1).tolist()]


class GradVac(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`GradVacWeighting` (same arguments)."""

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(GradVacWeighting(beta, eps))
