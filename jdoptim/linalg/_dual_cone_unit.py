"""The scaled form in which the torch dual-cone solvers work: unit diagonal, unit-size rows.

Problem (1) of :mod:`jdoptim.linalg._dual_cone`, ``v = argmin vᵀGv s.t. v ≥ u``, keeps its solutions
under ``G → DGD``, ``u → D⁻¹u`` (``D = diag(G)^-½``, then ``v = D v'``) and under ``u → c u`` for
``c > 0`` (then ``v = c v'``). Solving the scaled problem makes every tolerance relative.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class UnitProblem(NamedTuple):
    """Float64 scaled problem: ``gramian`` (unit diagonal) and ``bounds`` (rows of max-norm 1)."""

    gramian: Tensor
    bounds: Tensor
    column_scale: Tensor
    row_scale: Tensor

    def solution(self, original_bounds: Tensor, slack: Tensor, dtype: torch.dtype) -> Tensor:
        """``v = u + D s r`` from a slack of the scaled problem: active bounds hold exactly."""
        return (original_bounds + slack * self.row_scale * self.column_scale).to(dtype)


def unit_problem(matrix: Tensor, lower_bounds: Tensor) -> UnitProblem:
    """Scales ``(G, U)`` as the module docstring says, in float64, without host synchronisation."""
    gramian = matrix.to(torch.float64)
    bounds = lower_bounds.to(torch.float64)
    diagonal = gramian.diagonal()
    column_scale = torch.where(diagonal > 0, diagonal.clamp(min=1e-300).rsqrt(), 1.0)
    unit_gramian = column_scale[:, None] * gramian * column_scale[None, :]
    unit_bounds = bounds / column_scale
    row_scale = unit_bounds.abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(row_scale > 0, row_scale, 1.0)
    return UnitProblem(unit_gramian, unit_bounds / row_scale, column_scale, row_scale)
