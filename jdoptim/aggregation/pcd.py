"""PCD: priority-constrained descent, the primary objective first, the others guaranteed progress."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, real_in, unit_interval, validators
from jdoptim.aggregation._state_rows import check_state_rows
from jdoptim.linalg import (
    check_finite,
    check_tensor,
    inverse_cholesky_factor,
    min_norm_on_simplex,
    solve_qp,
)

# Relative ridge that makes the (possibly singular) normalised Gramian definite for quadprog; it
# moves the direction by about 1e-12 divided by the smallest non-zero eigenvalue.
_RIDGE = 1e-12


def _checked_tau(tau: float | Tensor) -> float | Tensor:
    """A float or a 1-D tensor (one per secondary objective), with values in [0, 1]."""
    if isinstance(tau, Tensor):
        check_tensor(tau, "tau")
        if tau.ndim != 1:
            raise ValueError(
                f"tau must be a float or a 1-D tensor (one per secondary objective), got shape "
                f"{tuple(tau.shape)}."
            )
        check_finite(tau, "tau")
        checked: float | Tensor = tau.detach().clone()
        in_range = bool(((tau >= 0) & (tau <= 1)).all())
    else:
        checked = real_in("tau", 0.0, 1.0)(tau)
        in_range = True
    if not in_range:
        raise ValueError(f"tau must be in [0, 1], got {tau}.")
    return checked


class PCDWeighting(Stateful, Weighting):
    r"""Stateful weights of PCD; row 0 of the Gramian is the primary objective.

    *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization* (TMLR 2026, arXiv:2606.29521). With the normalised rows
    ``g̃ᵢ = sᵢ gᵢ``, ``sᵢ = 1/√(v̂ᵢ + ε)`` where ``v̂ᵢ`` is the bias-corrected moving average (rate
    ``β``) of ``‖gᵢ‖²`` over the calls, PCD solves

    ``d̃ = argmin_d ½ ‖d − g̃₀‖²  s.t.  g̃ⱼᵀ d ≥ τⱼ ‖g̃ⱼ‖²  for every secondary j ≥ 1``

    and returns ``d̃`` rescaled to the norm of ``g₀``: it follows the primary gradient as closely
    as possible while each secondary objective keeps a fraction ``τⱼ`` of the first-order progress
    of its own normalised step. The optimum lies in the span of the rows, ``d̃ = Σₖ uₖ g̃ₖ``, so the
    problem is a QP in ``u`` on the Gramian (solved exactly with quadprog, tiny ridge for rank
    deficient Gramians) and ``w = ‖g₀‖ / ‖d̃‖ · u ⊙ s``. When ``g₀ = 0`` or ``d̃ = 0`` the weights
    are 0.

    The constraints scale with ``d``, so they can all hold unless 0 lies in the convex hull of the
    secondary rows (``m ≥ 3``: rows ``g`` and ``−g`` among them, say; then no scaled-down ``τ``
    helps either). In that case, a stated relaxation, every ``τⱼ`` is set to 0: the constraints
    read ``g̃ⱼᵀd ≥ 0``, which ``d = 0`` satisfies, so PCD still follows the primary gradient as
    closely as it can without making any secondary objective worse to first order.

    Args:
        tau: ``τ ∈ [0, 1]``, one float for every secondary objective or a ``[m - 1]`` tensor.
        beta: moving-average rate ``β ∈ [0, 1)`` of the squared norms.
        eps: ``ε ≥ 0`` added to ``v̂`` before its inverse square root.

    State: the moving average ``v`` and the call count; :meth:`reset` clears both.
    """

    tau: float | Tensor

    hyper_parameters = validators(
        tau=_checked_tau,
        beta=unit_interval("beta", high_open=True),
        eps=non_negative("eps"),
    )

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}.")
        self.tau = tau
        self.beta = beta
        self.eps = eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        taus = self._taus(rows)
        gram = gramian.detach().to(device="cpu", dtype=torch.float64)
        squared_norms = gram.diagonal().clamp(min=0)
        average = self._state.get("average")
        if average is None:
            average, calls = torch.zeros_like(squared_norms), 0
        else:
            check_state_rows(self, average, rows)
            average, calls = average.to(squared_norms), int(self._state["calls"])
        average = self.beta * average + (1 - self.beta) * squared_norms
        calls += 1
        self._state.update(average=average.to(gramian), calls=calls)

        second_moments = average / (1 - self.beta**calls) + self.eps
        # A row that has always been zero (with eps = 0) stays zero: scale it by 0, not by inf.
        scales = torch.where(second_moments > 0, second_moments.rsqrt(), 0.0)
        normalized = (scales[:, None] * gram * scales[None, :]).numpy()
        rounding = 10 * torch.finfo(gramian.dtype).eps
        coefficients = _closest_to_primary(normalized, taus, rounding)
        squared_norm = float(coefficients @ normalized @ coefficients)
        rounding_bound = float(np.abs(coefficients) @ np.abs(normalized) @ np.abs(coefficients))
        if squared_norms[0] <= 0 or squared_norm <= rounding * rounding_bound:
            return gramian.new_zeros(rows)
        factor = float(squared_norms[0].sqrt()) / np.sqrt(squared_norm)
        weights = torch.from_numpy(factor * coefficients) * scales
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def _taus(self, rows: int) -> np.ndarray:
        if not isinstance(self.tau, Tensor):
            return np.full(rows - 1, self.tau, dtype=np.float64)
        if self.tau.shape[0] != rows - 1:
            raise ValueError(
                f"tau has {self.tau.shape[0]} entries but there are {rows - 1} secondary "
                "objectives; give one per row after the first."
            )
        return np.asarray(self.tau.detach().cpu().double().numpy(), dtype=np.float64)

    def _repr_args(self) -> str:
        tau = self.tau.tolist() if isinstance(self.tau, Tensor) else self.tau
        return f"tau={tau}, beta={self.beta}, eps={self.eps}"


def _closest_to_primary(gramian: np.ndarray, taus: np.ndarray, rounding: float) -> np.ndarray:
    """``u`` minimising ``½ (u − e₀)ᵀ G (u − e₀)`` s.t. ``(G u)ⱼ ≥ τⱼ Gⱼⱼ`` for ``j ≥ 1``.

    The constraints scale with ``d``, so they can all hold as soon as some ``d`` has
    ``g̃ⱼᵀd > 0`` for every ``j`` with ``τⱼ > 0``: exactly when 0 is not in the convex hull of
    those rows (Gordan). Otherwise they are relaxed to ``τ = 0``, which ``d = 0`` satisfies.
    ``rounding`` is the relative size below which a squared norm counts as 0.
    """
    size = gramian.shape[0]
    primary = np.zeros(size)
    primary[0] = 1.0
    if size == 1:
        return primary
    relaxed = np.zeros_like(taus)
    secondary = gramian[1:, 1:]
    # A zero row's constraint reads 0 ≥ 0: it always holds and takes no part.
    binding = (taus > 0) & (np.diagonal(secondary) > rounding * float(np.diagonal(gramian).max()))
    if not _can_all_gain(secondary, binding, rounding):
        taus = relaxed
    try:
        return _solve_constrained(gramian, taus)
    except ValueError:
        return _solve_constrained(gramian, relaxed)


def _can_all_gain(secondary: np.ndarray, positive: np.ndarray, rounding: float) -> bool:
    """Whether some ``d`` has ``g̃ⱼᵀd > 0`` for every secondary row ``j`` marked ``positive``."""
    if not bool(positive.any()):
        return True
    block = secondary[np.ix_(positive, positive)]
    weights = min_norm_on_simplex(torch.from_numpy(block)).numpy()
    scale = float(np.diagonal(block).max())
    return float(weights @ block @ weights) > rounding * scale


def _solve_constrained(gramian: np.ndarray, taus: np.ndarray) -> np.ndarray:
    size = gramian.shape[0]
    primary = np.zeros(size)
    primary[0] = 1.0
    ridge = _RIDGE * max(float(np.trace(gramian)) / size, 1e-300)
    matrix = gramian + ridge * np.eye(size)
    constraints = gramian[:, 1:]
    bounds = taus * np.diagonal(gramian)[1:]
    return solve_qp(inverse_cholesky_factor(matrix), matrix @ primary, constraints, bounds)


class PCD(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`PCDWeighting` (same arguments)."""

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))

    def reset(self) -> None:
        """Forgets the weighting's state: the moving average of the squared norms and the call count."""
        weighting = self.weighting
        assert isinstance(weighting, PCDWeighting)
        weighting.reset()
