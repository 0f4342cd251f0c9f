"""A thin, robust wrapper over ``quadprog`` for small dense quadratic programs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import quadprog

Array = npt.NDArray[np.float64]

_MAX_JITTER_TRIES = 6


def inverse_cholesky_factor(matrix: Array) -> Array:
    """Returns ``R⁻¹`` where ``matrix = Rᵀ R`` (R upper triangular), as quadprog's factorized input.

    A Gramian computed in low precision can have slightly negative eigenvalues; when the
    factorisation fails, a growing multiple of the identity (relative to the trace) is added, up to
    ``1e-2`` of it. Beyond that the matrix is not a Gramian and a ``ValueError`` is raised.
    """
    size = matrix.shape[0]
    scale = max(float(np.trace(matrix)) / max(size, 1), 1e-300)
    jitter = 0.0
    for attempt in range(_MAX_JITTER_TRIES):
        try:
            lower = np.linalg.cholesky(matrix + jitter * np.eye(size))
        except np.linalg.LinAlgError:
            jitter = scale * 10.0 ** (-12 + 2 * attempt)
            continue
        return np.asarray(np.linalg.inv(lower).T, dtype=np.float64)
    raise ValueError(
        "The Gramian is not positive semi-definite, even up to a 1e-2 regularisation: it has "
        "clearly negative eigenvalues, so it is not of the form J Jᵀ."
    )


def solve_qp(
    inverse_factor: Array, linear: Array, constraints: Array, bounds: Array, n_equalities: int = 0
) -> Array:
    """Solves ``min ½ xᵀGx − linearᵀx`` s.t. ``constraintsᵀ x ≥ bounds`` (first ones as equalities).

    ``inverse_factor`` is ``R⁻¹`` with ``G = RᵀR`` (see :func:`inverse_cholesky_factor`), so that one
    factorisation serves many problems sharing ``G``.
    """
    try:
        solution = quadprog.solve_qp(
            inverse_factor, linear, constraints, bounds, n_equalities, factorized=True
        )[0]
    except ValueError as error:
        raise ValueError(
            f"quadprog could not solve the quadratic program ({error}). The Gramian is probably too "
            "ill-conditioned; raise reg_eps or check the Jacobian for degenerate rows."
        ) from error
    return np.asarray(solution, dtype=np.float64)
