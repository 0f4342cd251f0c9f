"""GradVac: Gradient Vaccine, pairwise cosine similarities pulled toward their moving averages."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, unit_interval, validators
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

    hyper_parameters = validators(
        beta=unit_interval("beta"),
        eps=non_negative("eps"),
    )

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
            targets = gramian.new_zeros(rows, rows, dtype=torch.float64)
        else:
            check_state_rows(self, previous, rows)
            targets = previous.to(device=gramian.device, dtype=torch.float64).clone()
        gram = gramian.detach().to(torch.float64)
        norms = gram.diagonal().clamp(min=0).sqrt()
        orders = (
            torch.tensor([_others_in_random_order(i, rows) for i in range(rows)], dtype=torch.int64)
            .reshape(rows, rows - 1)
            .to(gramian.device)
        )
        everyone = torch.arange(rows, device=gramian.device)
        coefficients = torch.eye(rows, dtype=torch.float64, device=gramian.device)
        dots = gram.clone()  # dots[i, j] = gᵢ' · gⱼ = (C G)ᵢⱼ
        # Rows are corrected independently of each other, so all rows take their t-th pair at once.
        for t in range(rows - 1):
            others = orders[:, t]
            row_norms = (coefficients * dots).sum(dim=1).clamp(min=0).sqrt()
            cosines = _safe_divide(dots[everyone, others], row_norms * norms[others] + self.eps)
            goals = targets[everyone, others]
            sines, goal_sines = _sine(cosines), _sine(goals)
            steps = _safe_divide(
                row_norms * (goals * sines - cosines * goal_sines),
                norms[others] * goal_sines + self.eps,
            )
            steps = torch.where(cosines < goals, steps, torch.zeros_like(steps))
            coefficients[everyone, others] += steps
            dots += steps[:, None] * gram[others]
            targets[everyone, others] = (1 - self.beta) * goals + self.beta * cosines
        self._state["targets"] = targets.to(gramian.dtype)
        return coefficients.sum(dim=0).to(gramian.dtype)

    def _repr_args(self) -> str:
        return f"beta={self.beta}, eps={self.eps}"


def _sine(cosines: Tensor) -> Tensor:
    return (1 - cosines.square()).clamp(min=0).sqrt()


def _safe_divide(numerators: Tensor, denominators: Tensor) -> Tensor:
    """Entrywise ratio, 0 where the denominator is 0 (zero rows with ``eps = 0``)."""
    safe = torch.where(denominators == 0, torch.ones_like(denominators), denominators)
    return torch.where(denominators == 0, torch.zeros_like(numerators), numerators / safe)


def _others_in_random_order(index: int, rows: int) -> list[int]:
    others = [k for k in range(rows) if k != index]
    return [others[k] for k in torch.randperm(rows - 1).tolist()]


class GradVac(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`GradVacWeighting` (same arguments)."""

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(GradVacWeighting(beta, eps))

    def reset(self) -> None:
        """Forgets the weighting's state: the cosine targets (back to 0)."""
        weighting = self.weighting
        assert isinstance(weighting, GradVacWeighting)
        weighting.reset()
