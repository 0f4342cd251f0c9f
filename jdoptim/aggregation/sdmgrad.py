"""SDMGrad: stochastic direction-oriented multi-objective gradient descent."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import Weighting
from jdoptim.aggregation._hyper import (
    integer_at_least,
    non_negative,
    positive,
    unit_interval,
    validators,
)
from jdoptim.aggregation._pref import check_pref_vector, pref_weights
from jdoptim.aggregation._state_rows import check_state_rows
from jdoptim.linalg import project_onto_simplex


class SDMGradWeighting(Stateful, Weighting):
    r"""Stateful weights of SDMGrad from the cross-Gramian ``A = J₁ J₂ᵀ`` of two independent batches.

    Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms* (NeurIPS 2023). The update direction is the combination of the rows closest to the
    preference direction ``g₀ = J p̃`` in the sense of

    ``min_{w ∈ Δ} ½ ‖Jᵀw + λ Jᵀp̃‖²``, with the unbiased stochastic gradient ``A (w + λ p̃)``

    built from the Jacobians ``J₁``, ``J₂`` of two independent batches (ξ', ξ in the paper's
    Algorithm 1; ``A`` is square but neither symmetric nor PSD). Each call runs ``n_iter`` steps of
    SGD with momentum (heavy ball, fresh buffer per call) projected on the simplex Δ, starting
    from the previous call's ``w`` (uniform at first), on ``A / s²`` where ``s`` is the mean of the
    square roots of the non-negative diagonal entries of ``A`` (so ``lr`` does not depend on the
    gradients' scale, §6.1). It returns ``(w + λ p̃) / (1 + λ)``, to combine a third batch's losses.

    Args:
        lr: learning rate of the inner SGD (positive).
        momentum: momentum of the inner SGD, in ``[0, 1)``.
        n_iter: inner SGD iterations per call (positive).
        lambda_: pull ``λ ≥ 0`` toward the preference direction (0.3 as in the paper's experiments).
        pref_vector: preference ``p̃`` over the objectives; ``None`` means uniform ``1/m``.

    State: the simplex weights ``w`` of the last call; :meth:`reset` restarts from uniform.
    """

    input_kind = "cross_gramian"
    scale_invariant = True
    pref_vector: Tensor | None

    hyper_parameters = validators(
        lr=positive("lr"),
        momentum=unit_interval("momentum", high_open=True),
        n_iter=integer_at_least("n_iter", 1),
        lambda_=non_negative("lambda_"),
        pref_vector=check_pref_vector,
    )

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be non-negative, got {lambda_}.")
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.register_buffer("pref_vector", check_pref_vector(pref_vector), persistent=False)

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        pref = pref_weights(self.pref_vector, matrix)
        previous = self._state.get("weights")
        if previous is None:
            weights = torch.full_like(pref, 1.0 / rows)
        else:
            check_state_rows(self, previous, rows)
            weights = previous.to(pref)
        cross = _normalize_by_diagonal(matrix.detach())
        target = self.lambda_ * (cross @ pref)
        velocity = torch.zeros_like(weights)
        for _ in range(self.n_iter):
            gradient = cross @ weights + target
            velocity = self.momentum * velocity + gradient
            weights = project_onto_simplex(weights - self.lr * velocity)
        self._state["weights"] = weights
        return (weights + self.lambda_ * pref) / (1 + self.lambda_)

    def _repr_args(self) -> str:
        return (
            f"lr={self.lr}, momentum={self.momentum}, n_iter={self.n_iter}, "
            f"lambda_={self.lambda_}, pref_vector={tensor_repr(self.pref_vector)}"
        )


def _normalize_by_diagonal(matrix: Tensor) -> Tensor:
    """``A / s²`` with ``s`` the mean of ``sqrt(max(diag A, 0))``; ``A`` itself when ``s = 0``."""
    scale = matrix.diagonal().clamp(min=0).sqrt().mean()
    if bool(scale == 0):
        return matrix
    return matrix / scale**2
