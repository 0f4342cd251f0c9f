"""CAGrad: the direction near the mean gradient that maximises the worst objective's improvement."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, validators
from jdoptim.linalg import (
    Array,
    inverse_cholesky_factor,
    normalize_gramian,
    regularize_gramian,
    solve_qp,
)

# The distance equation is solved to this precision relative to the radius.
_RELATIVE_TOLERANCE = 1e-12
_MAX_NEWTON_STEPS = 30
_PROXIMAL_PASSES = 4


class CAGradWeighting(Weighting):
    r"""Weights of CAGrad (Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*,
    NeurIPS 2021, Algorithm 1).

    With the mean gradient ``g₀ = Jᵀ 1/m``, CAGrad's direction solves
    ``max_d minᵢ gᵢᵀd`` s.t. ``‖d - g₀‖ ≤ c ‖g₀‖``. The paper solves its dual,
    ``min_{w ∈ Δ} g_wᵀg₀ + c‖g₀‖ ‖g_w‖``, and sets ``d = g₀ + (c‖g₀‖ / ‖g_w‖) g_w``.

    Here the same optimum is found in-house, from ``G`` alone: for a level ``t``, the point of
    ``{d : J d ≥ t}`` closest to ``g₀`` is ``g₀ + Jᵀλ(t)`` with
    ``λ(t) = argmin_{λ ≥ 0} ½ λᵀGλ - λᵀ(t - G 1/m)`` (one quadprog QP, one Cholesky factorisation
    shared by all), and its distance ``‖Jᵀλ(t)‖`` is convex and non-decreasing in ``t``, with
    derivative ``Σλ / ‖Jᵀλ‖``. The largest ``t`` at distance ``c‖g₀‖`` is the optimal worst
    improvement and ``d = g₀ + Jᵀλ``, so the weights are ``1/m + λ``. Newton's method finds it from
    above (monotonically, the distance being convex) on the ridged Gramian, then polishes it with
    proximal-point passes that remove the ridge's bias. For a non-singular ``G`` the result is exact
    to about ``1e-12``; for a singular one, to about ``√reg_eps`` (relative), and ``d`` never leaves
    the ball. Away from degenerate cases ``λ = (c‖g₀‖ / ‖g_w‖) w``, the paper's formula; when the
    rows' convex hull contains 0 (where that formula divides 0 by 0) this still returns a maximiser
    (to the same precision).
    Eigenvalues of the normalised Gramian below its dtype's rounding (``m · eps · λ_max``) are
    set to 0 first, so that a float32 Gramian rounded to a slightly indefinite matrix still gives
    a non-conflicting ``d`` (``c ≥ 1`` with 0 in the rows' hull: ``d = 0``); below float64 the
    weights are also projected onto the range of ``G`` (same ``d``, least norm), which keeps
    ``wᵀJ`` from rounding to a conflicting direction.
    The authors' code optionally divides ``d`` by ``1 + c²``; this follows the paper and does not
    (scale the learning rate to match).

    Args:
        c: radius of the ball around ``g₀``, relative to ``‖g₀‖`` (``c ≥ 0``; ``c = 0`` is Mean).
        norm_eps: accepted for compatibility with TorchJD's signature, where it guards a division
            by ``‖g_w‖``; the solver here has no such division, so it is unused.
        reg_eps: multiple of the identity added to the trace-normalised Gramian in the QPs, to make
            them strictly convex.
    """

    scale_invariant = True

    hyper_parameters = validators(
        c=non_negative("c"),
        norm_eps=non_negative("norm_eps"),
        reg_eps=non_negative("reg_eps"),
    )

    def __init__(self, c: float, norm_eps: float = 1e-4, *, reg_eps: float = 1e-10) -> None:
        super().__init__()
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite non-negative number, got {c}.")
        if not norm_eps >= 0:
            raise ValueError(f"norm_eps must be non-negative, got {norm_eps}.")
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.c = c
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        size = gramian.shape[0]
        eps = torch.finfo(gramian.dtype).eps
        matrix = _positive_semi_definite(
            normalize_gramian(gramian.detach().to(torch.float64)).cpu().numpy(), eps
        )
        mean = np.full(size, 1.0 / size)
        alignment = matrix @ mean  # gᵢᵀg₀
        radius = self.c * math.sqrt(max(float(mean @ alignment), 0.0))
        weights = mean
        if radius > 0:
            weights = mean + self._multipliers(matrix, alignment, radius)
            if gramian.dtype != torch.float64:
                weights = _without_null_space(weights, matrix, eps)
        return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)

    def _multipliers(self, matrix: Array, alignment: Array, radius: float) -> Array:
        """``λ(t*)`` for the largest level ``t*`` whose closest point is ``radius`` away from g₀."""
        size = matrix.shape[0]
        regularized = regularize_gramian(torch.from_numpy(matrix), self.reg_eps).numpy()
        factor = inverse_cholesky_factor(regularized)
        constraints = np.eye(size)
        bounds = np.zeros(size)

        def closest_point(level: float, passes: int) -> tuple[Array, float]:
            multipliers = np.zeros(size)
            # Proximal-point passes: each one removes most of the ridge's bias where G is regular.
            for _ in range(passes):
                linear = level - alignment + self.reg_eps * multipliers
                multipliers = np.maximum(solve_qp(factor, linear, constraints, bounds), 0.0)
            metric = regularized if passes == 1 else matrix
            return multipliers, math.sqrt(max(float(multipliers @ metric @ multipliers), 0.0))

        # No d in the ball beats minᵢ(gᵢᵀg₀ + radius ‖gᵢ‖): the levels worth trying are below.
        highest = float((alignment + radius * np.sqrt(np.maximum(matrix.diagonal(), 0.0))).min())

        def newton(level: float, passes: int) -> tuple[Array, float, bool]:
            """Multipliers, level, and whether the level is optimal (to the tolerance).

            Without convergence (a rank-deficient ``G`` makes the QPs' solutions noisy at about
            ``1e-16 / reg_eps``), the best level found inside the ball is returned.
            """
            multipliers, distance = closest_point(level, passes)
            best: tuple[Array, float] | None = None
            for _ in range(_MAX_NEWTON_STEPS):
                if abs(distance - radius) <= _RELATIVE_TOLERANCE * radius:
                    return multipliers, level, True
                if distance <= radius:
                    if level >= highest:
                        return multipliers, level, True  # the highest level is reachable
                    if best is None or level > best[1]:
                        best = (multipliers, level)
                # d(distance)/dt = Σλ / distance (envelope theorem).
                step = (distance - radius) * distance / max(float(multipliers.sum()), 1e-300)
                if step == 0.0:
                    break
                level = min(level - step, highest)
                multipliers, distance = closest_point(level, passes)
            if best is not None:
                return best[0], best[1], False
            return multipliers, level, False

        # The ridged distance is convex in t: Newton from the far side converges monotonically.
        multipliers, level, _ = newton(highest, 1)
        # Polish without the ridge's bias; kept only where it converges (G regular enough).
        polished, _, converged = newton(level, _PROXIMAL_PASSES)
        return polished if converged else multipliers

    def _repr_args(self) -> str:
        return f"c={self.c}, norm_eps={self.norm_eps}, reg_eps={self.reg_eps}"


def _positive_semi_definite(matrix: Array, eps: float) -> Array:
    """``G`` with its eigenvalues below ``m · eps · λ_max`` set to 0.

    A Gramian rounded to the rows' dtype can have slightly negative eigenvalues (``-8e-9`` for a
    float32 one whose rows have 0 in their convex hull); the solver would exploit them and return
    a direction that conflicts with the rows. They are rounding noise of a singular ``G``.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    threshold = matrix.shape[0] * eps * max(float(eigenvalues[-1]), 0.0)
    cleaned = np.where(eigenvalues > threshold, eigenvalues, 0.0)
    result: Array = (eigenvectors * cleaned) @ eigenvectors.T
    symmetric: Array = (result + result.T) / 2
    return symmetric


def _without_null_space(weights: Array, matrix: Array, eps: float) -> Array:
    """The least-norm weights of the same direction: ``w`` projected onto the range of ``G``.

    ``Jᵀw`` ignores any component of ``w`` in the null space of ``G``, but the solver may leave a
    large one there (when 0 is in the rows' convex hull the dual optimum is not unique); in a
    dtype below float64, ``wᵀJ`` would then round to a conflicting direction. (In float64 the
    rounding is negligible and the weights keep their dual form ``1/m + λ``, ``λ ≥ 0``.) Eigenvalues below
    ``m · eps · λ_max`` (``eps`` of the Gramian's dtype) count as null: rounding noise of ``G``.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    threshold = matrix.shape[0] * eps * max(float(eigenvalues[-1]), 0.0)
    kept = eigenvectors[:, eigenvalues > threshold]
    projected: Array = kept @ (kept.T @ weights)
    return projected


class CAGrad(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`CAGradWeighting` (same arguments)."""

    def __init__(self, c: float, norm_eps: float = 1e-4, *, reg_eps: float = 1e-10) -> None:
        super().__init__(CAGradWeighting(c, norm_eps, reg_eps=reg_eps))
