"""Dual-cone projection by primal-dual active-set rounds with a fixed budget: no host sync inside.

Problem (1) of :mod:`jdoptim.linalg._dual_cone` for every row ``u`` of ``U``, written with the slack
``s = v - u`` as the linear complementarity problem ``μ = G s + G u, s ≥ 0, μ ≥ 0, sᵀμ = 0``. A
guess of the free set ``F = {j : s_j > 0}`` gives ``s`` by one linear solve, ``G_FF s_F = -(G u)_F``;
the primal-dual active-set method (Hintermüller, Ito & Kunisch, *The primal-dual active set strategy
as a semismooth Newton method*, 2002; the full exchange of Júdice & Pires, 1994) then moves every
index with a wrong sign (``s_j < 0`` in ``F``, ``μ_j < 0`` outside) to the other set and solves again.
From ``F = {j : (G u)_j < 0}`` it identified the free sets of random, low-rank and near-duplicate
Gramians in at most six rounds up to m = 512; from the previous step's free sets (a warm start) one
round usually suffices.

Every round is the same few tensor operations for all rows at once (the systems are padded to
``m x m`` with the identity outside ``F`` and factorised by one batched Cholesky), so the number of
operations does not depend on the data and nothing waits for the device until the single KKT check
after the budget. Rows that fail it get a second budget from where they stopped; rows that fail
again are reported by :class:`DualConeConvergenceError`, never returned unconverged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg._dual_cone_batched import DualConeConvergenceError
from jdoptim.linalg._dual_cone_unit import unit_problem

#: Rounds from a cold start, and from a warm start (the previous solution's free sets).
COLD_ROUNDS = 8
WARM_ROUNDS = 4
# Signs and the stationarity residual max_j∈F |μ_j| are judged relative to max |G u| (at least 1)
# of the unit-scaled problem.
_TOLERANCE = 1e-10
# Padded systems are factorised in chunks of rows holding at most this many entries (2 GiB in
# float64; a round holds about three such tensors at once). Every chunk costs its own ~130 operations,
# so m ≤ 512 (UPGrad's k = m rows) runs in one.
_CHUNK_ENTRIES = 2**28


def solve_dual_cone_active_set(
    matrix: Tensor,
    lower_bounds: Tensor,
    *,
    warm_start: Tensor | None = None,
    rounds: int | None = None,
) -> Tensor:
    """Returns the ``[k, m]`` solutions of ``min vᵀGv`` s.t. ``v ≥ u`` for the rows ``u`` of ``U``.

    Args:
        matrix: ``[m, m]`` symmetric positive-definite ``G`` (see
            :func:`jdoptim.linalg.prepare_dual_cone_gramian`).
        lower_bounds: ``[k, m]`` matrix ``U``.
        warm_start: optional ``[k, m]`` guess of the solutions (such as the previous step's): the
            rounds start from its free sets ``{j : v_j > u_j}``. It changes which rounds are run,
            not which solution is accepted.
        rounds: rounds of the first budget (default ``WARM_ROUNDS`` with a guess, else
            ``COLD_ROUNDS``); the second budget, for the rows that fail the first check, is
            ``COLD_ROUNDS``.

    Returns:
        The solutions on ``matrix``'s device and with its dtype, computed in float64.

    Raises:
        DualConeConvergenceError: if some rows still fail the KKT check after both budgets (their
            active sets cycle, or ``G`` is singular); ``partial`` holds the others.
    """
    problem = unit_problem(matrix, lower_bounds)
    initial_free = None
    if warm_start is not None:
        if warm_start.shape != lower_bounds.shape:
            raise ValueError(
                f"warm_start must have the shape of lower_bounds {tuple(lower_bounds.shape)}, got "
                f"{tuple(warm_start.shape)}."
            )
        initial_free = warm_start.to(lower_bounds) > lower_bounds
    first_budget = (
        rounds if rounds is not None else (COLD_ROUNDS if initial_free is None else WARM_ROUNDS)
    )
    slack, free, converged = _solve_in_chunks(
        problem.gramian, problem.bounds, initial_free, first_budget
    )
    bounds = lower_bounds.to(torch.float64)
    if not bool(converged.all()):
        retry = (~converged).nonzero().flatten()
        again, _, converged_again = _solve_in_chunks(
            problem.gramian, problem.bounds[retry], free[retry], COLD_ROUNDS
        )
        slack[retry] = again
        converged[retry] = converged_again
        if not bool(converged_again.all()):
            unconverged = retry[~converged_again]
            slack[unconverged] = 0.0
            raise DualConeConvergenceError(
                f"The active-set dual-cone solver did not converge in {first_budget} + "
                f"{COLD_ROUNDS} rounds for {unconverged.numel()} of {bounds.shape[0]} rows.",
                problem.solution(bounds, slack, matrix.dtype),
                unconverged,
            )
    return problem.solution(bounds, slack, matrix.dtype)


def _solve_in_chunks(
    gramian: Tensor, bounds: Tensor, initial_free: Tensor | None, rounds: int
) -> tuple[Tensor, Tensor, Tensor]:
    size = gramian.shape[0]
    chunk = max(1, _CHUNK_ENTRIES // max(size * size, 1))
    if bounds.shape[0] <= chunk:
        return _active_set_rounds(gramian, bounds, initial_free, rounds)
    parts = [
        _active_set_rounds(
            gramian,
            bounds[start : start + chunk],
            None if initial_free is None else initial_free[start : start + chunk],
            rounds,
        )
        for start in range(0, bounds.shape[0], chunk)
    ]
    slack, free, converged = zip(*parts, strict=True)
    return torch.cat(slack), torch.cat(free), torch.cat(converged)


def _active_set_rounds(
    gramian: Tensor, bounds: Tensor, initial_free: Tensor | None, rounds: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Slack, last free sets and KKT verdict per row after ``rounds`` rounds (at least one).

    Only the last round's solve is judged, so a factorisation that failed in an earlier round
    (possible only for a singular ``G``) can misguide the free sets but never the verdict.
    """
    linear = bounds @ gramian  # row r: G u_r
    threshold = -_TOLERANCE * linear.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    free = linear < threshold if initial_free is None else initial_free.to(gramian.device)
    identity = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    zeros = torch.zeros_like(linear)
    negated = -linear
    rounds = max(rounds, 1)
    for round_index in range(rounds):
        both = free.unsqueeze(2) & free.unsqueeze(1)
        factor, info = torch.linalg.cholesky_ex(torch.where(both, gramian, identity))
        rhs = torch.where(free, negated, zeros).unsqueeze(2)
        slack = torch.cholesky_solve(rhs, factor).squeeze(2)
        multiplier = torch.addmm(linear, slack, gramian)
        wrong = torch.where(free, slack < threshold, multiplier < threshold)
        if round_index < rounds - 1:
            free = free ^ wrong
    stationary = torch.where(free, multiplier.abs(), zeros) <= -threshold
    converged = (info == 0) & ~wrong.any(dim=1) & stationary.all(dim=1)
    return torch.where(converged.unsqueeze(1), slack.clamp(min=0.0), zeros), free, converged
