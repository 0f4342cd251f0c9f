"""Linear-algebra building blocks: Gramians, dual-cone projection, simplex problems, checks."""

from jdoptim.linalg._alpha_fair import solve_alpha_fair
from jdoptim.linalg._checks import (
    check_finite,
    check_generalized_gramian,
    check_gramian,
    check_matrix,
    check_square,
    check_tensor,
)
from jdoptim.linalg._dual_cone import (
    DualConeSolver,
    prepare_dual_cone_gramian,
    project_to_dual_cone,
)
from jdoptim.linalg._dual_cone_batched import DualConeConvergenceError
from jdoptim.linalg._gramian import (
    flatten_generalized_gramian,
    gramian_from_jacobian,
    normalize_gramian,
    power_of_two_scale,
    regularize_gramian,
    reshape_gramian,
)
from jdoptim.linalg._quadprog import Array, inverse_cholesky_factor, solve_qp
from jdoptim.linalg._simplex import min_norm_on_simplex, project_onto_simplex

__all__ = [
    "Array",
    "DualConeConvergenceError",
    "DualConeSolver",
    "check_finite",
    "check_generalized_gramian",
    "check_gramian",
    "check_matrix",
    "check_square",
    "check_tensor",
    "flatten_generalized_gramian",
    "gramian_from_jacobian",
    "inverse_cholesky_factor",
    "min_norm_on_simplex",
    "normalize_gramian",
    "power_of_two_scale",
    "prepare_dual_cone_gramian",
    "project_onto_simplex",
    "project_to_dual_cone",
    "regularize_gramian",
    "reshape_gramian",
    "solve_alpha_fair",
    "solve_qp",
]
