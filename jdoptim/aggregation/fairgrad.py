"""FairGrad: the α-fair allocation of the update among the objectives."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim._warnings import warn
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import (
    integer_at_least,
    non_negative,
    optional,
    validators,
)
from jdoptim.linalg import solve_alpha_fair

# Backward error above which the weights are reported as inaccurate.
_RESIDUAL_WARNING = 1e-6


class FairGradWeighting(Weighting):
    r"""Weights of FairGrad (Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024,
    Eq. 4).

    FairGrad picks the update ``d = Jᵀw`` whose improvements ``G w = J d`` (one per objective)
    maximise the α-fair utility ``Σᵢ (gᵢᵀd)^(1-α) / (1-α)`` (``Σ log`` for ``α = 1``, which is
    Nash-MTL) under a norm budget; its optimality condition is ``G w = w^(-1/α)`` elementwise with
    ``w > 0``. That system is solved in-house by Newton's method on the convex potential it is the
    gradient of (see :func:`jdoptim.linalg.solve_alpha_fair`), to a componentwise backward error of
    ``1e-10``; a ``RuntimeWarning`` reports any solution worse than ``1e-6``. ``α = 0`` is the mean
    improvement (the linear utility: uniform weights ``1/m``, as the paper's Section 3 and TorchJD
    have it), ``α = 1`` proportional fairness, ``α → ∞`` the worst objective (max-min).
    The equation is not scale-free: scaling ``J`` by ``s`` scales ``w`` by ``s^(-2α/(α+1))``.

    Args:
        alpha: fairness parameter ``α ≥ 0``.
        max_iters: Newton iterations at most (``None``: 100).
        reg_eps: ridge added to ``G``, relative to its mean diagonal, so that a solution exists
            when some gradient is zero.
    """

    hyper_parameters = validators(
        alpha=non_negative("alpha"),
        max_iters=optional(integer_at_least("max_iters", 1)),
        reg_eps=non_negative("reg_eps"),
    )

    def __init__(
        self, alpha: float, max_iters: int | None = None, *, reg_eps: float = 1e-10
    ) -> None:
        super().__init__()
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite non-negative number, got {alpha}.")
        if max_iters is not None and max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer or None, got {max_iters}.")
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.alpha = alpha
        self.max_iters = max_iters
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        size = gramian.shape[0]
        matrix = gramian.to(torch.float64)
        mean_diagonal = float(matrix.diagonal().mean())
        if self.alpha == 0 or not mean_diagonal > 0:
            # α = 0: the linear utility, maximised along the mean. Every gradient zero: any
            # weights give the same (zero) update.
            return torch.full((size,), 1.0 / size, dtype=gramian.dtype, device=gramian.device)
        max_iters = 100 if self.max_iters is None else self.max_iters
        weights, residual = solve_alpha_fair(
            matrix, self.alpha, ridge=self.reg_eps * mean_diagonal, max_iters=max_iters
        )
        if residual > _RESIDUAL_WARNING:
            warn(
                f"FairGrad's system G w = w^(-1/α) was solved only to a backward error of "
                f"{residual:.2e} in {max_iters} iterations; raise max_iters.",
                RuntimeWarning,
            )
        return weights.to(gramian.dtype)

    def _repr_args(self) -> str:
        return f"alpha={self.alpha}, max_iters={self.max_iters}, reg_eps={self.reg_eps}"


class FairGrad(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`FairGradWeighting` (same arguments)."""

    def __init__(
        self, alpha: float, max_iters: int | None = None, *, reg_eps: float = 1e-10
    ) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters, reg_eps=reg_eps))
