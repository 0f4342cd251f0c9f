"""IMTL-G: the impartial (gradient) part of Impartial Multi-Task Learning."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.linalg import normalize_gramian


class IMTLGWeighting(Weighting):
    r"""Weights of IMTL-G (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021).

    IMTL-G looks for ``d = wᵀJ`` with ``Σ wᵢ = 1`` whose projection on every unit gradient
    ``gᵢ / ‖gᵢ‖`` is the same. With ``G = J Jᵀ`` and ``s = sqrt(diag G)`` (the norms), the condition
    reads ``G w = c s``, so ``w = v / Σ vᵢ`` with ``v = G⁺ s``: the paper's closed form, written on
    the Gramian. The pseudo-inverse handles singular Gramians (duplicated rows share their weight)
    and zero rows (which get weight 0; their direction is undefined).

    When ``Σ vᵢ`` vanishes (for instance when the gradients positively span a subspace, such as
    ``e₁, e₂, −e₁−e₂``) no such ``d`` exists and the weights are all zero. As in the paper,
    ``Σ wᵢ = 1`` is enforced even when ``Σ vᵢ < 0``; then the common projection is negative.
    """

    differentiable = True

    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        # w is invariant to G -> kG; normalising keeps huge or tiny Gramians finite.
        matrix = normalize_gramian(gramian)
        norms = matrix.diagonal().clamp(min=0).sqrt()
        # Eigenvalues below this relative level are round-off of a rank-deficient Gramian.
        rtol = math.sqrt(torch.finfo(gramian.dtype).eps)
        unnormalized: Tensor = torch.linalg.pinv(matrix, rtol=rtol, hermitian=True) @ norms
        total = unnormalized.sum()
        if not bool(total.abs() > rtol * unnormalized.abs().sum()):
            return torch.zeros_like(norms)
        return unnormalized / total


class IMTLG(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`IMTLGWeighting`."""

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
