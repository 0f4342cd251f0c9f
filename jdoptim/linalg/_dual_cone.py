"""Projection onto the dual cone of the rows of a Jacobian, in weight space.

For a Jacobian ``J`` with Gramian ``G = J Jᵀ`` and a weight vector ``u``, the projection of ``uᵀJ``
onto the dual cone ``{x : J x ≥ 0}`` is ``vᵀJ`` with

    v = argmin_v  vᵀ G v   subject to   v ≥ u                                  (1)

(Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024, Prop. 1). Problem (1)
is scale-invariant in ``G``, so it is solved on ``G / trace(G) + reg_eps * I``, which stays positive
definite for the rank-deficient Gramians of real models.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from jdoptim.linalg._dual_cone_batched import DualConeConvergenceError, solve_dual_cone_batched
from jdoptim.linalg._gramian import normalize_gramian, regularize_gramian
from jdoptim.linalg._quadprog import inverse_cholesky_factor, solve_qp

DualConeSolver = Literal["auto", "quadprog", "batched"]

# On the CPU, quadprog (one QP per row) beats the batched solver up to this many objectives
# (measured with benchmarks/bench_dual_cone.py; see docs/performance.md).
_QUADPROG_MAX_SIZE = 24


def prepare_dual_cone_gramian(gramian: Tensor, reg_eps: float) -> Tensor:
    """The matrix problem (1) is actually solved on: symmetrised, normalised, regularised."""
    symmetric = (gramian + gramian.T) / 2
    return regularize_gramian(normalize_gramian(symmetric), reg_eps)


def project_to_dual_cone(
    gramian: Tensor,
    lower_bounds: Tensor,
    *,
    reg_eps: float = 1e-4,
    solver: DualConeSolver = "auto",
) -> Tensor:
    """Solves problem (1) for every row of ``lower_bounds``.

    Args:
        gramian: ``[m, m]`` Gramian ``J Jᵀ``.
        lower_bounds: ``[k, m]`` matrix whose rows are the vectors ``u``.
        reg_eps: multiple of the identity added to the trace-normalised Gramian.
        solver: ``"quadprog"`` (exact active set, one problem per row on the CPU, through numpy),
            ``"batched"`` (all rows together in torch on ``gramian``'s device, see
            :func:`jdoptim.linalg._dual_cone_batched.solve_dual_cone_batched`), or ``"auto"``:
            quadprog when ``reg_eps`` is zero, on MPS, or for small ``m`` on the CPU; the batched
            solver otherwise (on CUDA always), whose rare unconverged rows (very ill-conditioned
            problems) are then finished by quadprog.

    Returns:
        ``[k, m]`` matrix whose row ``i`` is the solution ``v`` for ``u = lower_bounds[i]``, on the
        device and with the dtype of ``gramian``.
    """
    if reg_eps < 0:
        raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
    if solver not in ("auto", "quadprog", "batched"):
        raise ValueError(f"solver must be 'auto', 'quadprog' or 'batched', got {solver!r}.")
    matrix = prepare_dual_cone_gramian(gramian.detach(), reg_eps)
    bounds = lower_bounds.detach()
    if choose_dual_cone_solver(gramian, reg_eps, solver) == "quadprog":
        return _project_quadprog(matrix, bounds)
    try:
        return solve_dual_cone_batched(matrix, bounds)
    except DualConeConvergenceError as error:
        if solver != "auto":
            raise
        # "auto" promises a solution: quadprog finishes the few rows the batched solver could not.
        solution = error.partial
        solution[error.rows] = _project_quadprog(matrix, bounds[error.rows])
        return solution


def choose_dual_cone_solver(
    gramian: Tensor, reg_eps: float, solver: DualConeSolver
) -> Literal["quadprog", "batched"]:
    """The solver ``"auto"`` stands for, given the Gramian's size and device.

    Without regularisation (``reg_eps == 0``) the problem may be singular, which quadprog's jittered
    factorisation handles and conjugate gradients may not, so quadprog solves it on every device.
    """
    if solver != "auto":
        return solver
    # MPS has no float64, which the batched solver needs for its residuals.
    if reg_eps == 0 or gramian.device.type == "mps":
        return "quadprog"
    if gramian.device.type != "cpu":
        return "batched"
    return "quadprog" if gramian.shape[0] <= _QUADPROG_MAX_SIZE else "batched"


def _project_quadprog(matrix: Tensor, lower_bounds: Tensor) -> Tensor:
    # Rows where v = u already satisfies the KKT conditions (G u ≥ 0) need no QP.
    solution = lower_bounds.clone()
    needs_qp = ((lower_bounds @ matrix) < 0).any(dim=1)
    rows = needs_qp.nonzero().flatten().tolist()
    if not rows:
        return solution
    matrix_np = matrix.to(device="cpu", dtype=torch.float64).numpy()
    bounds_np = lower_bounds.to(device="cpu", dtype=torch.float64).numpy()
    inverse_factor = inverse_cholesky_factor(matrix_np)
    size = matrix_np.shape[0]
    identity = np.eye(size)
    zeros = np.zeros(size)
    solved = np.stack(
        [
            solve_qp(inverse_factor, zeros, identity, np.ascontiguousarray(bounds_np[i]))
            for i in rows
        ]
    )
    # Round-off may leave a solution a hair below its bound; the bound is part of the definition.
    solved = np.maximum(solved, bounds_np[rows])
    solution[rows] = torch.from_numpy(solved).to(dtype=matrix.dtype, device=matrix.device)
    return solution
