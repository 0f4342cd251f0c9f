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
    the Gramian, and solved on the unit gradients' Gramian (their cosines) so that a short gradient
    counts as much as a long one. The pseudo-inverse handles singular Gramians (duplicated
    directions share their weight) and zero rows (which get weight 0; their direction is
    undefined).

    When the unit gradients positively span a subspace (such as ``e₁, e₂, −e₁−e₂``), no such ``d``
    exists but ``0`` and the weights are all zero. As in the paper,
    ``Σ wᵢ = 1`` is enforced even when ``Σ vᵢ < 0``; then the common projection is negative.
    """

    differentiable = True

    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        if gramian.dtype in (torch.float16, torch.bfloat16):  # torch has no half pinv
            return self.forward(gramian.float()).to(gramian.dtype)
        # w is invariant to G -> kG; normalising keeps huge or tiny Gramians finite.
        matrix = normalize_gramian(gramian)
        norms = matrix.diagonal().clamp(min=0).sqrt()
        present = norms > 0
        inverse_norms = present / torch.where(present, norms, 1.0)
        # G w = c s is C y = c 1 for the unit gradients' Gramian C = S⁻¹ G S⁻¹ (their cosines) and
        # w = S⁻¹ y. The pseudo-inverse's cutoff then judges the directions alone: on G itself it
        # dropped every gradient much shorter than the longest (below 1/50 of it in float32),
        # however independent its direction, which IMTL-G exists to weigh impartially.
        cosines = inverse_norms[:, None] * matrix * inverse_norms[None, :]
        # Eigenvalues below this relative level are round-off of a rank-deficient Gramian.
        rtol = math.sqrt(torch.finfo(gramian.dtype).eps)
        pseudo_inverse = torch.linalg.pinv(cosines, rtol=rtol, hermitian=True)
        ones = present.to(matrix.dtype)
        scaled = pseudo_inverse @ ones
        unnormalized: Tensor = inverse_norms * scaled
        total = unnormalized.sum()
        # C y = 1 has no solution when the unit gradients positively span a subspace (only d = 0
        # projects equally on all of them); pinv then returns a least-squares y, not IMTL-G's.
        consistent = (cosines @ scaled - ones).abs().amax() <= math.sqrt(rtol)
        if not bool(consistent & (total.abs() > rtol * unnormalized.abs().sum())):
            return torch.zeros_like(norms)
        return unnormalized / total


class IMTLG(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`IMTLGWeighting`."""

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
