"""ExcessMTL: task weights driven by estimated excess risks."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import WeightedAggregator, Weighting
from jdoptim.aggregation._hyper import integer_at_least, positive, validators
from jdoptim.aggregation._state_rows import check_state_shape

# Keeps the AdaGrad-style curvature estimate invertible for coordinates never seen non-zero.
_CURVATURE_EPS = 1e-7


class ExcessMTLWeighting(Stateful, Weighting):
    r"""Stateful weights of ExcessMTL, from the Jacobian ``J`` (one row per task).

    He, Zhou, Zhao, Zhang & Han, *Robust Multi-Task Learning with Excess Risks* (ICML 2024). The
    excess risk of task ``i`` is estimated by a second-order expansion around the optimum with an
    AdaGrad-style diagonal curvature (eqs. 6-7): ``Sᵢ += gᵢ ⊙ gᵢ`` at every call and
    ``eᵢ = Σₖ gᵢₖ² / √(Sᵢₖ + ε)``. The weights ``α ∈ Δ`` (uniform at first) then take one
    exponentiated-gradient step per call (eq. 9), on excess risks relative to a baseline ``e⁰``:

    ``αᵢ ← αᵢ exp(η eᵢ / eᵢ⁰)``, then ``α ← α / Σ α``

    (computed in log space; a task with ``eᵢ⁰ = 0`` gets ratio 0).

    The baseline is the mean excess risk of the first ``n_warmup_steps`` calls (during which the
    weights stay uniform), or the first call's when ``n_warmup_steps = 0``. Unlike the official
    code (and torchjd 0.18), the first update also uses the ratio ``eᵢ / eᵢ⁰ = 1`` rather than the raw
    ``eᵢ``, so the weights never depend on the gradients' scale; with ``n_warmup_steps ≥ 1`` both
    definitions coincide.

    Args:
        robust_step_size: step size ``η > 0`` of the exponentiated update.
        n_warmup_steps: calls that only collect statistics (the paper suggests 3 epochs).

    State: ``S`` (``[m, n]``, as large as ``J``), ``α``, the baseline and the call count;
    :meth:`reset` clears them all (weights back to uniform, warmup again).
    """

    input_kind = "matrix"

    hyper_parameters = validators(
        robust_step_size=positive("robust_step_size"),
        n_warmup_steps=integer_at_least("n_warmup_steps", 0),
    )

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        if not robust_step_size > 0:
            raise ValueError(f"robust_step_size must be positive, got {robust_step_size}.")
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, int):
            raise TypeError(f"n_warmup_steps must be an int, got {n_warmup_steps!r}.")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be non-negative, got {n_warmup_steps}.")
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        jacobian = matrix.detach()
        squares = self._state.get("squared_gradients")
        if squares is None:
            squares = torch.zeros_like(jacobian)
            weights = jacobian.new_full((rows,), 1.0 / rows)
            risk_sum = jacobian.new_zeros(rows)
            calls = 0
        else:
            check_state_shape(self, squares, jacobian)
            squares = squares.to(jacobian)
            weights = self._state["weights"].to(jacobian)
            risk_sum = self._state["risk_sum"].to(jacobian)
            calls = int(self._state["calls"])
        squares = squares + jacobian.square()
        risks = (jacobian.square() / (squares + _CURVATURE_EPS).sqrt()).sum(dim=1)
        calls += 1
        if calls <= self.n_warmup_steps:
            risk_sum = risk_sum + risks
        else:
            if self.n_warmup_steps == 0 and calls == 1:
                risk_sum = risks
            baseline = risk_sum / max(self.n_warmup_steps, 1)
            # A task whose gradient was zero throughout the warmup has no baseline to compare to.
            ratios = torch.where(baseline > 0, risks / baseline, 0.0)
            # In log space, so that large ratios cannot overflow exp().
            weights = torch.softmax(weights.log() + self.robust_step_size * ratios, dim=0)
        self._state.update(
            squared_gradients=squares, weights=weights, risk_sum=risk_sum, calls=calls
        )
        return weights

    def _repr_args(self) -> str:
        return f"robust_step_size={self.robust_step_size}, n_warmup_steps={self.n_warmup_steps}"


class ExcessMTL(WeightedAggregator):
    """Aggregates the Jacobian with :class:`ExcessMTLWeighting` (same arguments)."""

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))

    def reset(self) -> None:
        """Forgets the weighting's state: the curvature estimates, the weights, the baseline and the call count."""
        weighting = self.weighting
        assert isinstance(weighting, ExcessMTLWeighting)
        weighting.reset()
