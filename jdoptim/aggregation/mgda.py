"""MGDA: the multiple-gradient descent algorithm's common descent direction."""

from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, validators
from jdoptim.linalg import min_norm_on_simplex


class MGDAWeighting(Weighting):
    """Weights of the min-norm point of the convex hull of the rows: ``argmin_{w ∈ Δ} wᵀ G w``.

    Désidéri, *Multiple-gradient descent algorithm (MGDA) for multiobjective optimization* (2012);
    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018). Solved
    exactly by an active-set method rather than Frank-Wolfe iterations.

    Args:
        reg_eps: multiple of the identity added to the trace-normalised Gramian to make the problem
            strictly convex; the default keeps the point exact to about ``1e-8``.
    """

    scale_invariant = True

    hyper_parameters = validators(
        reg_eps=non_negative("reg_eps"),
    )

    def __init__(self, reg_eps: float = 1e-10) -> None:
        super().__init__()
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        return min_norm_on_simplex(gramian, self.reg_eps)

    def _repr_args(self) -> str:
        return f"reg_eps={self.reg_eps}"


class MGDA(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`MGDAWeighting` (same arguments)."""

    def __init__(self, reg_eps: float = 1e-10) -> None:
        super().__init__(MGDAWeighting(reg_eps))
