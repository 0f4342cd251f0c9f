"""CR-MOGM: correlation-reduced stochastic multi-objective gradient manipulation."""

from __future__ import annotations

import math

from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim._step_info import StepAware, StepInfo
from jdoptim.aggregation._bases import Weighting
from jdoptim.aggregation._hyper import boolean, unit_interval, validators
from jdoptim.aggregation._state_rows import check_state_rows
from jdoptim.linalg import check_finite, check_tensor


def _checked_initial_weights(initial_weights: Tensor | None) -> Tensor | None:
    if initial_weights is None:
        return None
    check_tensor(initial_weights, "initial_weights")
    if initial_weights.ndim != 1:
        raise ValueError(
            f"initial_weights must be a 1-D tensor (one weight per objective), got shape "
            f"{tuple(initial_weights.shape)}."
        )
    check_finite(initial_weights, "initial_weights")
    return initial_weights.detach().clone()


class CRMOGMWeighting(Stateful, Weighting):
    r"""Smooths the weights of any weighting with an exponential moving average across calls.

    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, *On the Convergence of Stochastic Multi-Objective Gradient
    Manipulation and Beyond* (NeurIPS 2022). Weights computed from one mini-batch alone are
    correlated with that batch's gradients, which biases the stochastic direction and can stop
    MGDA-like methods from converging; averaging the weights over steps removes the correlation:

    ``λₖ = α λₖ₋₁ + (1 − α) λ̂ₖ``, with ``λ̂ₖ = weighting(input)``,

    and ``λ₀ = initial_weights`` (or ``λ̂₁``, so that the first output is ``λ̂₁``). It takes the
    same input as the wrapped weighting (Gramian, matrix or cross-Gramian); wrap it in the
    aggregator matching that input (``GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))``).

    The paper's analysis lets the averaging slow down as the learning rate decays. With
    ``follow_lr=True``, :meth:`after_step` (called by the jdoptim optimizers after each step) sets
    ``α = 1 − lr / lr₁``, where ``lr₁`` is the learning rate of the first step: no averaging
    while the learning rate is at its initial value, weights frozen as it goes to 0. The ``α`` of a
    call follows the learning rate of the previous step (one step behind a scheduler).

    Args:
        weighting: the weighting whose output is averaged.
        alpha: weight ``α ∈ [0, 1]`` of the previous average (0: no averaging, 1: frozen weights).
        initial_weights: ``λ₀``, or ``None`` to start from the first computed weights.
        follow_lr: let ``after_step`` set ``α`` from the learning rate, as above.

    State: ``λₖ₋₁`` (and with ``follow_lr``, ``lr₁`` and the current ``α``), plus the wrapped
    weighting's own state; :meth:`reset` clears both.
    """

    initial_weights: Tensor | None

    hyper_parameters = validators(
        alpha=unit_interval("alpha"),
        follow_lr=boolean("follow_lr"),
        initial_weights=_checked_initial_weights,
    )

    def __init__(
        self,
        weighting: Weighting,
        alpha: float = 0.9,
        initial_weights: Tensor | None = None,
        *,
        follow_lr: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(
                f"weighting must be a Weighting (such as UPGradWeighting()), got "
                f"{type(weighting).__name__}."
            )
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        self.weighting = weighting
        self.alpha = alpha
        self.follow_lr = follow_lr
        self.register_buffer(
            "initial_weights", _checked_initial_weights(initial_weights), persistent=False
        )
        # Why: the wrapper accepts whatever its inner weighting accepts, so these class-level
        # facts become per-instance ones.
        vars(self).update(
            input_kind=weighting.input_kind,
            requires_values=weighting.requires_values,
            scale_invariant=weighting.scale_invariant,
            differentiable=weighting.differentiable,
        )

    @property
    def current_alpha(self) -> float:
        """The ``α`` the next call uses (set by :meth:`after_step` when ``follow_lr``)."""
        return float(self._state.get("alpha", self.alpha))

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        estimate = self.weighting(matrix)
        previous = self._state.get("weights")
        if previous is None and self.initial_weights is not None:
            previous = self.initial_weights
        if previous is None:
            weights = estimate
        else:
            check_state_rows(self, previous, rows)
            alpha = self.current_alpha
            weights = alpha * previous.to(estimate) + (1 - alpha) * estimate
        self._state["weights"] = weights.detach()
        return weights

    def after_step(self, info: StepInfo) -> None:
        """Moves ``α`` with the learning rate (if ``follow_lr``) and forwards to the inner method."""
        if self.follow_lr and math.isfinite(info.lr):
            first_lr = float(self._state.setdefault("first_lr", info.lr))
            alpha = 1.0 - info.lr / first_lr if first_lr > 0 else 1.0
            self._state["alpha"] = min(max(alpha, 0.0), 1.0)
        if isinstance(self.weighting, StepAware):
            self.weighting.after_step(info)

    def reset(self) -> None:
        """Forgets the average (and ``lr₁``) and resets the wrapped weighting if it is stateful."""
        super().reset()
        if isinstance(self.weighting, Stateful):
            self.weighting.reset()

    def _repr_args(self) -> str:
        initial = None if self.initial_weights is None else self.initial_weights.tolist()
        return (
            f"{self.weighting!r}, alpha={self.alpha}, initial_weights={initial}, "
            f"follow_lr={self.follow_lr}"
        )
