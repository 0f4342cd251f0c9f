"""MoCo: stochastic multi-objective gradient correction by tracking the gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import non_negative, positive, real_in, validators
from jdoptim.aggregation._state_rows import check_state_shape
from jdoptim.linalg import power_of_two_scale, project_onto_simplex


class MoCo(Stateful, Aggregator):
    r"""Aggregator of MoCo: MGDA on tracked gradients, which removes the stochastic bias.

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, *Mitigating Gradient Bias in Multi-Objective
    Learning: A Provably Convergent Approach* (ICLR 2023), Algorithm 1. At call ``k`` (from 1),
    with step sizes ``βₖ = β / k^{σ_β}`` and ``γₖ = γ / k^{σ_γ}``:

    * the tracked gradients move toward the new Jacobian, ``Y ← Y − βₖ (Y − J)`` (``Y₀ = 0``),
    * the weights take a projected step on ``½ ‖Yᵀλ‖² + ½ ρ ‖λ‖²``,
      ``λ ← Π_Δ(λ − γₖ (Y Yᵀ + ρ I) λ)`` (``λ₀`` uniform),
    * the direction is ``d = Yᵀ λ``.

    The direction combines the tracked ``Y``, not ``J``, so MoCo is an aggregator without a
    weighting form. The paper's projection of ``Y`` onto a bounded set (needed only by the proof)
    and LibMTL's loss-scaled gradient normalisation are left out.

    Args:
        beta, beta_sigma: tracking step ``β ∈ (0, 1]`` and its decay exponent ``σ_β ≥ 0``.
        gamma, gamma_sigma: weight step ``γ > 0`` and its decay exponent ``σ_γ ≥ 0``.
        rho: ℓ2 regularisation ``ρ ≥ 0`` of the weights.

    State: ``Y`` (``[m, n]``, as large as ``J``), ``λ`` and ``k``; :meth:`reset` clears them.
    """

    hyper_parameters = validators(
        beta=real_in("beta", 0.0, 1.0, low_open=True),
        beta_sigma=non_negative("beta_sigma"),
        gamma=positive("gamma"),
        gamma_sigma=non_negative("gamma_sigma"),
        rho=non_negative("rho"),
    )

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}.")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}.")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        jacobian = matrix.detach()
        tracked = self._state.get("tracked")
        if tracked is None:
            tracked = torch.zeros_like(jacobian)
            weights = jacobian.new_full((rows,), 1.0 / rows)
            calls = 0
        else:
            check_state_shape(self, tracked, jacobian)
            tracked = tracked.to(jacobian)
            weights = self._state["weights"].to(jacobian)
            calls = int(self._state["calls"])
        calls += 1
        tracked = tracked - self.beta / calls**self.beta_sigma * (tracked - jacobian)
        gradient = _gramian_times(tracked, weights) + self.rho * weights.to(torch.float64)
        step = self.gamma / calls**self.gamma_sigma
        weights = project_onto_simplex(weights.to(torch.float64) - step * gradient).to(weights)
        self._state.update(tracked=tracked, weights=weights, calls=calls)
        direction: Tensor = weights @ tracked
        return direction

    def _repr_args(self) -> str:
        return (
            f"beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
            f"gamma_sigma={self.gamma_sigma}, rho={self.rho}"
        )


def _gramian_times(rows: Tensor, weights: Tensor) -> Tensor:
    """``(Y Yᵀ) λ`` in float64, without forming ``Y Yᵀ`` nor overflowing ``Y``'s dtype.

    ``Y (Yᵀλ / s) s`` with ``s`` a power of two near ``‖Yᵀλ‖∞``: the product in ``Y``'s dtype
    stays at the size of ``Y``'s entries, and only the ``[m]`` result meets ``s`` (in float64).
    """
    combination = rows.T @ weights
    scale = power_of_two_scale(combination)
    product: Tensor = rows @ (combination / scale)
    return product.to(torch.float64) * scale.to(torch.float64)
