"""GradNorm: loss weights learnt so that every task trains at the same relative rate."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim._step_info import StepInfo
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, positive, validators
from jdoptim.aggregation._state_rows import check_state_rows
from jdoptim.linalg import check_finite, check_tensor


def gradnorm_loss_gradient(
    weights: Tensor, gradient_norms: Tensor, ratios: Tensor, alpha: float
) -> Tensor:
    r"""The gradient w.r.t. ``w`` of GradNorm's ``L_grad = Σᵢ |wᵢ‖gᵢ‖ − Ḡ·rᵢ^α|``.

    ``Ḡ = meanⱼ(wⱼ‖gⱼ‖)`` is held constant, as the paper prescribes (its targets must not pull the
    weighted norms toward zero), so ``∂L_grad/∂wᵢ = sign(wᵢ‖gᵢ‖ − Ḡ·rᵢ^α)·‖gᵢ‖``.
    """
    weighted_norms = weights * gradient_norms
    targets = weighted_norms.mean() * ratios.pow(alpha)
    return torch.sign(weighted_norms - targets) * gradient_norms


class GradNormWeighting(Stateful, Weighting):
    r"""Weights updated by GradNorm's gradient step, which balances the tasks' training rates.

    Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks* (ICML 2018), Section 3. With ``‖gᵢ‖ = √Gᵢᵢ`` (the norm of
    task ``i``'s gradient w.r.t. the covered parameters; the paper uses one shared layer), the
    inverse training rates ``L̃ᵢ = Lᵢ(t) / Lᵢ(0)`` and ``rᵢ = L̃ᵢ / mean(L̃)``, each call

    * returns the current weights ``w`` (all ones at first),
    * then takes a step ``w ← w − lr·∇_w L_grad`` on ``L_grad = Σᵢ |wᵢ‖gᵢ‖ − Ḡ·rᵢ^α|``
      (:func:`gradnorm_loss_gradient`, ``Ḡ`` held constant), clips ``w`` at 0 (a guard the paper
      does not need with small steps) and renormalises it to ``Σᵢ wᵢ = m``.

    So the weights of step ``t`` are the ones learnt up to step ``t − 1``, as in the paper's
    Algorithm 1, where ``w(t)`` weights the update of the network and ``w(t + 1)`` is learnt from
    the same gradients. The losses come from :meth:`observe_losses`, which the jdoptim optimizers
    call through :meth:`after_step` with each step's losses: the first observed losses are
    ``L(0)``, the latest ones ``L(t)``; the call of step ``t`` thus uses the losses of step
    ``t − 1`` (one step behind the paper, since a weighting only sees the Gramian). Until losses
    are observed, ``r = 1``: the weighted norms are pulled toward their mean.

    The losses must be one per task (the Gramian's rows), the same tasks at every step, and
    positive. With fixed ``G`` and ``r``, the weighted norms approach their targets (up to an
    ``O(lr)`` oscillation) when the targets sum to ``Σᵢ wᵢ‖gᵢ‖``, that is for ``α ∈ {0, 1}``; for
    other ``α`` they sum to ``Ḡ·Σᵢ rᵢ^α`` and are only approached up to that mismatch. ``lr`` acts
    on the raw gradient norms, so it depends on their scale, as in the paper.

    Args:
        alpha: strength ``α ≥ 0`` of the pull toward equal training rates (0: equal weighted norms).
        lr: step size ``> 0`` of the weights' update.

    State: ``w``, ``L(0)`` and ``L(t)``; :meth:`reset` clears them.
    """

    differentiable = True

    hyper_parameters = validators(
        alpha=non_negative("alpha"),
        lr=positive("lr"),
    )

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite non-negative number, got {alpha}.")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {lr}.")
        self.alpha = alpha
        self.lr = lr

    @property
    def ratios(self) -> Tensor | None:
        """``r = L̃ / mean(L̃)`` from the observed losses, or ``None`` before any are observed."""
        initial = self._state.get("initial_losses")
        if initial is None:
            return None
        inverse_rates: Tensor = self._state["latest_losses"] / initial
        return inverse_rates / inverse_rates.mean()

    def observe_losses(self, losses: Tensor) -> None:
        """Records the losses of a step: the first ones as ``L(0)``, every one as ``L(t)``.

        Call it after each step when using this weighting outside the jdoptim optimizers.
        """
        check_tensor(losses, "losses")
        if losses.ndim != 1:
            raise ValueError(
                f"GradNorm takes one loss per task (a 1-D tensor), got shape {tuple(losses.shape)}."
            )
        check_finite(losses, "The losses given to GradNorm")
        if bool((losses <= 0).any()):
            raise ValueError(
                "GradNorm divides by the losses, so they must all be positive; got "
                f"{losses.tolist()}."
            )
        losses = losses.detach().clone()
        initial = self._state.get("initial_losses")
        if initial is None:
            self._state["initial_losses"] = losses
        else:
            check_state_rows(self, initial, losses.shape[0])
            losses = losses.to(initial)
        self._state["latest_losses"] = losses

    def after_step(self, info: StepInfo) -> None:
        """Observes the step's losses (called by the jdoptim optimizers after each update)."""
        self.observe_losses(info.losses.reshape(-1))

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        weights = self._state.get("weights")
        if weights is None:
            weights = gramian.new_ones(rows)
        else:
            check_state_rows(self, weights, rows)
            weights = weights.to(gramian)
        ratios = self.ratios
        if ratios is None:
            ratios = gramian.new_ones(rows)
        else:
            check_state_rows(self, ratios, rows)
            ratios = ratios.to(gramian)
        norms = gramian.detach().diagonal().clamp(min=0).sqrt()
        stepped = weights - self.lr * gradnorm_loss_gradient(weights, norms, ratios, self.alpha)
        stepped = stepped.clamp(min=0)
        total = stepped.sum()
        # Why: if every weight was clipped there is nothing to renormalise; start again from ones.
        stepped = stepped * (rows / total) if bool(total > 0) else torch.ones_like(stepped)
        self._state["weights"] = stepped
        return weights.clone()

    def _repr_args(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}"


class GradNorm(GramianWeightedAggregator):
    """``d = wᵀ J`` with GradNorm's learnt weights (see :class:`GradNormWeighting`)."""

    weighting: GradNormWeighting

    def __init__(self, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(GradNormWeighting(alpha, lr))

    def observe_losses(self, losses: Tensor) -> None:
        """Records a step's losses (see :meth:`GradNormWeighting.observe_losses`)."""
        self.weighting.observe_losses(losses)

    def reset(self) -> None:
        """Forgets the learnt weights and the observed losses."""
        self.weighting.reset()
