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

from jdoptim.linalg._dual_cone_active_set import solve_dual_cone_active_set
from jdoptim.linalg._dual_cone_batched import DualConeConvergenceError, solve_dual_cone_batched
from jdoptim.linalg._quadprog import inverse_cholesky_factor, solve_qp

DualConeSolver = Literal["auto", "quadprog", "batched", "active_set"]
_SOLVERS = ("auto", "quadprog", "batched", "active_set")

# "auto" on the CPU, from benchmarks/bench_dual_cone.py (see docs/performance.md): quadprog up to
# this many objectives, then the batched solver. At m = 25 to 32 cold calls are a toss-up (quadprog
# won on 5 of 7 Gramians at m = 32, by up to 2.7x, and lost by up to 1.6x), while the batched
# solver's warm start (per-task losses) is 2.3x faster than quadprog there; the active-set
# solver's padded factorisations are slower than the batched solver at every m here.
_CPU_QUADPROG_MAX_SIZE = 24
# "auto" on CUDA (reasoned, not measured: see docs/performance.md): quadprog after a host copy
# (tens of µs) while its CPU time (1.6 ms at m = 32 here) stays below the active-set solver's ~250
# kernel launches (5-10 µs each), then the active-set solver while its padded systems (k m²
# float64 entries, 1 GiB at m = 512, about three at once) fit one chunk.
_CUDA_QUADPROG_MAX_SIZE = 32
_CUDA_ACTIVE_SET_MAX_SIZE = 512


def prepare_dual_cone_gramian(gramian: Tensor, reg_eps: float) -> Tensor:
    """The matrix problem (1) is actually solved on: symmetrised, normalised, regularised.

    ``G / trace(G)`` (zero for a zero ``G``) after an exact power-of-two rescaling, so huge and tiny
    Gramians neither overflow nor underflow, then ``+ reg_eps I``; computed without host
    synchronisation.
    """
    symmetric = (gramian + gramian.T) / 2
    diagonal = symmetric.diagonal()
    largest = diagonal.abs().amax() if diagonal.numel() > 0 else diagonal.new_zeros(())
    # Any power of two scales exactly; frexp's needs no host read (the input is finite).
    scaled = torch.ldexp(symmetric, -torch.frexp(largest).exponent)
    trace = scaled.diagonal().sum()
    normalised = torch.where(trace > 0, scaled / trace, 0.0)
    return normalised + reg_eps * torch.eye(
        gramian.shape[0], dtype=gramian.dtype, device=gramian.device
    )


def project_to_dual_cone(
    gramian: Tensor,
    lower_bounds: Tensor,
    *,
    reg_eps: float = 1e-4,
    solver: DualConeSolver = "auto",
    warm_start: Tensor | None = None,
) -> Tensor:
    """Solves problem (1) for every row of ``lower_bounds``.

    Args:
        gramian: ``[m, m]`` Gramian ``J Jᵀ``.
        lower_bounds: ``[k, m]`` matrix whose rows are the vectors ``u``.
        reg_eps: multiple of the identity added to the trace-normalised Gramian.
        solver: ``"quadprog"`` (exact active set, one problem per row on the CPU, through numpy),
            ``"batched"`` (all rows together in torch on ``gramian``'s device: block principal
            pivoting with conjugate-gradient solves, see
            :func:`jdoptim.linalg._dual_cone_batched.solve_dual_cone_batched`), ``"active_set"``
            (all rows together, a fixed budget of active-set rounds with batched Cholesky solves
            and one host synchronisation, see
            :func:`jdoptim.linalg._dual_cone_active_set.solve_dual_cone_active_set`), or
            ``"auto"``: quadprog when ``reg_eps`` is zero or on MPS, otherwise the fastest of the
            three for the device and ``m`` (:func:`choose_dual_cone_solver`); rows a torch solver
            could not finish (very ill-conditioned problems) are then finished by the batched
            solver or quadprog, so ``"auto"`` always returns exact solutions.
        warm_start: optional ``[k, m]`` guess of the solutions, such as the previous step's (a
            guess of another shape is ignored). The torch solvers start from its free sets
            ``{j : v_j > u_j}`` (and the batched solver from its slacks); the solution accepted is
            the same, to the solvers' tolerance, with or without it.

    Returns:
        ``[k, m]`` matrix whose row ``i`` is the solution ``v`` for ``u = lower_bounds[i]``, on the
        device and with the dtype of ``gramian``.
    """
    if reg_eps < 0:
        raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
    if solver not in _SOLVERS:
        raise ValueError(
            f"solver must be 'auto', 'quadprog', 'batched' or 'active_set', got {solver!r}."
        )
    matrix = prepare_dual_cone_gramian(gramian.detach(), reg_eps)
    bounds = lower_bounds.detach()
    if bounds.shape[0] == 0:
        return bounds.to(matrix.dtype).clone()
    if warm_start is not None and warm_start.shape != bounds.shape:
        warm_start = None
    chosen = choose_dual_cone_solver(gramian, reg_eps, solver)
    if chosen == "quadprog":
        return _project_quadprog(matrix, bounds)
    if chosen == "active_set":
        try:
            return solve_dual_cone_active_set(matrix, bounds, warm_start=warm_start)
        except DualConeConvergenceError as error:
            if solver != "auto":
                raise
            # "auto" promises a solution: the pivoting solver (Murty's rule terminates) finishes
            # the rows whose active sets cycled.
            solution = error.partial
            solution[error.rows] = _project_batched_or_quadprog(matrix, bounds[error.rows])
            return solution
    try:
        return solve_dual_cone_batched(matrix, bounds, warm_start=warm_start)
    except DualConeConvergenceError as error:
        if solver != "auto":
            raise
        solution = error.partial
        solution[error.rows] = _project_quadprog(matrix, bounds[error.rows])
        return solution


def _project_batched_or_quadprog(matrix: Tensor, bounds: Tensor) -> Tensor:
    try:
        return solve_dual_cone_batched(matrix, bounds)
    except DualConeConvergenceError as error:
        # quadprog finishes the few rows the batched solver could not (very ill-conditioned).
        solution = error.partial
        solution[error.rows] = _project_quadprog(matrix, bounds[error.rows])
        return solution


def choose_dual_cone_solver(
    gramian: Tensor, reg_eps: float, solver: DualConeSolver
) -> Literal["quadprog", "batched", "active_set"]:
    """The solver ``"auto"`` stands for, given the Gramian's size and device.

    Without regularisation (``reg_eps == 0``) the problem may be singular, which quadprog's jittered
    factorisation handles and the torch solvers may not, so quadprog solves it on every device.
    """
    if solver != "auto":
        return solver
    size = gramian.shape[0]
    # MPS has no float64, which the torch solvers need for their residuals.
    if reg_eps == 0 or gramian.device.type == "mps":
        return "quadprog"
    if gramian.device.type == "cpu":
        return "quadprog" if size <= _CPU_QUADPROG_MAX_SIZE else "batched"
    if size <= _CUDA_QUADPROG_MAX_SIZE:
        return "quadprog"
    return "active_set" if size <= _CUDA_ACTIVE_SET_MAX_SIZE else "batched"


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
