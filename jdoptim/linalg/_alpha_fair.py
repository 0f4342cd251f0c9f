"""The α-fair weights of a Gramian: the positive solution of ``G w = w^(-1/α)``.

For ``α = 1`` this is Nash-MTL's bargaining solution ``G α = 1/α`` (Navon et al., 2022); for any
``α > 0`` it is FairGrad's α-fair allocation (Ban & Ji, 2024, Eq. 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ARMIJO = 1e-4
_MIN_STEP = 1e-12
# Keeps every iterate strictly inside w > 0 when a Newton step would leave it.
_FRACTION_TO_BOUNDARY = 0.95


def solve_alpha_fair(
    gramian: Tensor,
    alpha: float,
    *,
    ridge: float = 0.0,
    initial: Tensor | None = None,
    max_iters: int = 100,
    tol: float = 1e-10,
) -> tuple[Tensor, float]:
    r"""Returns ``(w, residual)`` with ``w > 0`` solving ``G w = w^(-1/α)`` elementwise.

    The equation is the stationarity condition of the strictly convex potential
    ``f(w) = ½ wᵀGw + Σᵢ h(wᵢ)`` on ``w > 0``, where ``h'(w) = -w^(-1/α)`` (``h = -log`` for
    ``α = 1``). It is solved by Newton's method on ``f`` with a backtracking (Armijo) line search
    that keeps the iterates positive, so every step decreases ``f`` and the last steps converge
    quadratically. Computation is in float64 on ``gramian``'s device.

    A Gramian rounded in low precision can have slightly negative eigenvalues, which would make
    ``f`` unbounded below; they are set to zero first. A solution then exists when ``G`` is positive
    definite; a ``G`` with a non-negative null vector (such as a zero row) has none, as the weights
    on that vector grow without bound: a positive ``ridge`` (added to the diagonal after the
    clipping) makes one exist.

    ``residual = maxᵢ |(G w)ᵢ - wᵢ^(-1/α)| / ((|G| w)ᵢ + wᵢ^(-1/α))`` is the componentwise backward
    error: ``w`` solves the equation exactly once the entries of ``G`` and of the right-hand side are
    perturbed by at most that relative amount. It is returned so that callers can verify the solution.

    Args:
        gramian: ``[m, m]`` symmetric positive-definite matrix (up to rounding).
        alpha: fairness parameter ``α > 0``.
        ridge: multiple of the identity added to ``G``, making it positive definite.
        initial: starting point (positive, ``[m]``), such as the previous step's solution;
            ``None`` starts from the solution for a diagonal ``G``, ``wᵢ = Gᵢᵢ^(-α/(α+1))``.
        max_iters: Newton iterations at most.
        tol: residual at which the iterations stop.
    """
    matrix = _clip_negative_eigenvalues(gramian.detach().to(torch.float64))
    matrix = matrix + ridge * torch.eye(matrix.shape[0], dtype=torch.float64, device=matrix.device)
    exponent = 1.0 / alpha
    if initial is not None and initial.shape == (matrix.shape[0],) and bool((initial > 0).all()):
        weights = initial.detach().to(dtype=torch.float64, device=matrix.device).clone()
    else:
        weights = matrix.diagonal().clamp_min(1e-300).pow(-alpha / (alpha + 1.0))

    def potential(w: Tensor) -> float:
        quadratic = 0.5 * float(w @ matrix @ w)
        if alpha == 1.0:
            return quadratic - float(w.log().sum())
        return quadratic - float(w.pow(1.0 - exponent).sum()) / (1.0 - exponent)

    def residual_of(w: Tensor) -> float:
        inverse_power = (-exponent * w.log()).exp()
        error = (matrix @ w - inverse_power).abs()
        return float((error / (matrix.abs() @ w + inverse_power)).max())

    residual = residual_of(weights)
    value = potential(weights)
    for _ in range(max_iters):
        if residual <= tol or not math.isfinite(residual):
            break
        inverse_power = (-exponent * weights.log()).exp()
        gradient = matrix @ weights - inverse_power
        hessian = matrix + torch.diag(exponent * inverse_power / weights)
        direction = -torch.linalg.solve(hessian, gradient)
        slope = float(gradient @ direction)
        shrinking = direction < 0
        step = 1.0
        if bool(shrinking.any()):
            to_boundary = float((-weights[shrinking] / direction[shrinking]).min())
            step = min(1.0, _FRACTION_TO_BOUNDARY * to_boundary)
        # Near the solution the decrease of f falls below its rounding; the residual then decides.
        flat = -slope <= 1e-13 * (1.0 + abs(value))
        while step > _MIN_STEP:
            candidate = weights + step * direction
            candidate_value = potential(candidate)
            if candidate_value <= value + _ARMIJO * step * slope:
                break
            if flat and residual_of(candidate) < residual:
                break
            step /= 2
        else:
            # No decrease is measurable any more: f is flat to rounding at the current point.
            break
        weights, value = candidate, candidate_value
        residual = residual_of(weights)
    return weights, residual


def _clip_negative_eigenvalues(matrix: Tensor) -> Tensor:
    symmetric = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)
    if bool((eigenvalues >= 0).all()):
        return symmetric
    clipped: Tensor = (eigenvectors * eigenvalues.clamp_min(0)) @ eigenvectors.T
    return (clipped + clipped.T) / 2
