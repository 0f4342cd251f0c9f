"""CAGrad: the direction near the mean gradient that maximises the worst objective's improvement."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.linalg import normalize_gramian, regularize_gramian
from jdoptim.linalg._quadprog import Array, inverse_cholesky_factor, solve_qp

# Bisection halvings on the scalar of the inner problem: enough for float64 resolution.
_BISECTION_STEPS = 60


class CAGradWeighting(Weighting):
    r"""Weights of CAGrad (Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021, Algorithm 1).

    With the mean gradient ``g₀ = Jᵀ 1/m``, CAGrad's direction solves
    ``max_d minᵢ gᵢᵀ d`` s.t. ``‖d - g₀‖ ≤ c ‖g₀‖``. Its dual is
    ``min_{w ∈ Δ} g_wᵀ g₀ + √φ ‖g_w‖`` with ``g_w = Jᵀ w`` and ``φ = c² ‖g₀‖²``, and the direction is
    ``d = g₀ + (√φ / ‖g_w‖) g_w``; so the weights are ``1/m + (√φ / ‖g_w‖) w``, all from ``G``.

    The dual is solved in-house and exactly: at its optimum, ``w`` also minimises the quadratic
    ``g_wᵀ g₀ + √φ ‖g_w‖² / (2r)`` over ``Δ`` for ``r = ‖g_w‖`` (both have the same gradient there),
    and the norm of that quadratic's solution grows with ``r``; a bisection on ``r``, each step one
    simplex QP (quadprog, one Cholesky factorisation shared by all), finds the fixed point.
    The authors' code optionally divides ``d`` by ``1 + c²``; this follows the paper and does not
    (scale the learning rate to match).

    Args:
        c: radius of the ball around ``g₀``, relative to ``‖g₀‖`` (``c ≥ 0``; ``c = 0`` is Mean).
        norm_eps: lower bound on ``‖g_w‖`` (of the trace-normalised Gramian) in the division, for
            when the rows' convex hull contains 0.
        reg_eps: multiple of the identity added to the trace-normalised Gramian in the QPs, to make
            them strictly convex.
    """

    scale_invariant = True

    def __init__(self, c: float, norm_eps: float = 1e-4, *, reg_eps: float = 1e-10) -> None:
        super().__init__()
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite non-negative number, got {c}.")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}.")
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.c = c
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        size = gramian.shape[0]
        matrix = normalize_gramian(gramian.to(torch.float64)).cpu().numpy()
        mean = np.full(size, 1.0 / size)
        alignment = matrix @ mean
        sqrt_phi = self.c * math.sqrt(max(float(mean @ alignment), 0.0))
        weights = mean
        if sqrt_phi > 0:
            dual = self._solve_dual(matrix, alignment, sqrt_phi)
            dual_norm = math.sqrt(max(float(dual @ matrix @ dual), 0.0))
            weights = mean + sqrt_phi / max(dual_norm, self.norm_eps) * dual
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def _solve_dual(self, matrix: Array, alignment: Array, sqrt_phi: float) -> Array:
        """``argmin_{w ∈ Δ} wᵀa + √φ √(wᵀGw)`` for ``a = G 1/m``, by bisection on ``r = ‖g_w‖``."""
        size = matrix.shape[0]
        regularized = regularize_gramian(torch.from_numpy(matrix), self.reg_eps).numpy()
        factor = inverse_cholesky_factor(regularized)
        constraints = np.concatenate([np.ones((size, 1)), np.eye(size)], axis=1)
        bounds = np.concatenate([[1.0], np.zeros(size)])

        def quadratic_solution(radius: float) -> tuple[Array, float]:
            # min ½ wᵀGw + (r/√φ) aᵀw over Δ: the quadratic above, divided by √φ/r.
            w = solve_qp(factor, -radius / sqrt_phi * alignment, constraints, bounds, 1)
            w = np.maximum(w, 0.0)
            w /= w.sum()
            return w, math.sqrt(max(float(w @ matrix @ w), 0.0))

        low, high = 0.0, math.sqrt(float(matrix.diagonal().max()))
        solution, norm = quadratic_solution(low)
        if norm <= 0.0:
            return solution
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            solution, norm = quadratic_solution(middle)
            if norm > middle:
                low = middle
            else:
                high = middle
        return quadratic_solution((low + high) / 2)[0]

    def _repr_args(self) -> str:
        return f"c={self.c}, norm_eps={self.norm_eps}, reg_eps={self.reg_eps}"


class CAGrad(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`CAGradWeighting` (same arguments)."""

    def __init__(self, c: float, norm_eps: float = 1e-4, *, reg_eps: float = 1e-10) -> None:
        super().__init__(CAGradWeighting(c, norm_eps, reg_eps=reg_eps))
