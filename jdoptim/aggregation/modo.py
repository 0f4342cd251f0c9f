"""MoDo: multi-objective gradient with double sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import Weighting
from jdoptim.aggregation._hyper import non_negative, positive, validators
from jdoptim.aggregation._state_rows import check_state_rows
from jdoptim.linalg import project_onto_simplex


class MoDoWeighting(Stateful, Weighting):
    r"""Stateful weights of MoDo from the cross-Gramian ``A = J₁ J₂ᵀ`` of two independent batches.

    Chen, Fang, Wang, Xu, Chen & Chen, *Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance* (NeurIPS 2023; JMLR 2024). MoDo tracks
    the MGDA weights ``λ ∈ Δ`` with one projected stochastic gradient step per call on
    ``½ ‖Jᵀλ‖² + ½ ρ ‖λ‖²``; sampling ``J`` twice (eq. 2.9a) makes ``A λ`` an unbiased estimate of
    the gradient ``J Jᵀ λ`` (a single-batch Gramian would bias it):

    ``λ ← Π_Δ(λ − γ (A λ + ρ λ))``.

    The returned ``λ`` combines the losses of the step (the mean of both batches' losses, eq. 2.9b,
    or a third batch's). No rescaling: ``γ`` acts on the raw ``A``.

    Args:
        gamma: step size ``γ`` of the weight update (positive).
        rho: ℓ2 regularisation ``ρ ≥ 0``.

    State: ``λ`` (uniform before the first call); :meth:`reset` restarts from uniform.
    """

    input_kind = "cross_gramian"

    hyper_parameters = validators(
        gamma=positive("gamma"),
        rho=non_negative("rho"),
    )

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}.")
        if not rho >= 0:
            raise ValueError(f"rho must be non-negative, got {rho}.")
        self.gamma = gamma
        self.rho = rho

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        previous = self._state.get("weights")
        if previous is None:
            weights = torch.full((rows,), 1.0 / rows, dtype=matrix.dtype, device=matrix.device)
        else:
            check_state_rows(self, previous, rows)
            weights = previous.to(matrix)
        gradient = matrix.detach() @ weights + self.rho * weights
        weights = project_onto_simplex(weights - self.gamma * gradient)
        self._state["weights"] = weights
        return weights

    def _repr_args(self) -> str:
        return f"gamma={self.gamma}, rho={self.rho}"
