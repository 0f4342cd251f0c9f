"""ConFIG: the conflict-free direction with equal cosine to every gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import validators
from jdoptim.aggregation._pref import check_pref_vector, pref_weights


class ConFIGWeighting(Weighting):
    r"""Weights of ConFIG (Liu et al., *ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks*, ICLR 2025, Eq. 2).

    With the unit rows ``U = D⁻¹ J`` (``D = diag(‖gᵢ‖)``), the direction is ``v = U⁺ p``: the
    least-norm vector with ``U v = p``, hence with cosine to each row ``gᵢ`` proportional to
    ``pᵢ`` (equal cosines for the default preference). The update is ``v/‖v‖`` scaled by the sum of
    the rows' projections onto it, ``d = (Σᵢ gᵢᵀv) v / ‖v‖²``.

    Everything depends on ``J`` through ``G`` only: ``U⁺ = Uᵀ (U Uᵀ)⁺`` gives ``v = Jᵀ a`` with
    ``a = D⁻¹ (D⁻¹ G D⁻¹)⁺ p``, so ``w = (1ᵀ G a / aᵀ G a) a``. Zero rows have no direction and get
    weight 0; where ``p`` has no component in the range of ``U`` (unit rows summing to zero, as
    ``g`` and ``-2g``), no direction has the preferred cosines and the weights are 0.

    Args:
        pref_vector: relative cosines ``p`` (positive); ``None`` means equal cosines.
    """

    differentiable = True

    scale_invariant = True
    pref_vector: Tensor | None

    hyper_parameters = validators(
        pref_vector=check_pref_vector,
    )

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pref_vector", check_pref_vector(pref_vector), persistent=False)

    def forward(self, gramian: Tensor, /) -> Tensor:
        pref = pref_weights(self.pref_vector, gramian).to(torch.float64)
        matrix = gramian.to(torch.float64)
        inverse_norms = _inverse_norms(matrix.diagonal().clamp_min(0).sqrt())
        unit_gramian = inverse_norms[:, None] * matrix * inverse_norms[None, :]
        # Eigenvalues of U Uᵀ below this are rounding noise of the Gramian's own precision.
        rtol = gramian.shape[0] * torch.finfo(gramian.dtype).eps
        solved = torch.linalg.pinv(unit_gramian, rtol=rtol, hermitian=True) @ pref
        if _out_of_range(unit_gramian @ solved, pref, gramian.dtype):
            return torch.zeros_like(pref).to(gramian.dtype)
        coefficients = inverse_norms * solved
        squared_norm = coefficients @ matrix @ coefficients
        projections = (matrix @ coefficients).sum()
        return _scaled(coefficients, projections, squared_norm).to(gramian.dtype)

    def _repr_args(self) -> str:
        return f"pref_vector={tensor_repr(self.pref_vector)}"


class ConFIG(GramianWeightedAggregator):
    """Aggregates the Jacobian with the weights of :class:`ConFIGWeighting` (same arguments).

    With ``J`` at hand, the weights are computed from the singular value decomposition of the unit
    rows ``U`` (in float64) rather than from the Gramian, whose pseudo-inverse squares ``U``'s
    condition number: ``(U Uᵀ)⁺ p = P Σ⁻² Pᵀ p`` for ``U = P Σ Qᵀ``. Its :attr:`weighting` serves the
    Gramian-only paths (autogram engine, fused optimizer step).
    """

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__(ConFIGWeighting(pref_vector))

    def compute_weights(self, matrix: Tensor, /) -> Tensor:
        weighting = self.weighting
        assert isinstance(weighting, ConFIGWeighting)
        pref = pref_weights(weighting.pref_vector, matrix).to(torch.float64)
        jacobian = matrix.to(torch.float64)
        if jacobian.shape[1] == 0:
            return matrix.new_zeros(matrix.shape[0])  # no parameters: every row is zero
        inverse_norms = _inverse_norms(jacobian.norm(dim=1))
        left, singular, _ = torch.linalg.svd(inverse_norms[:, None] * jacobian, full_matrices=False)
        # Singular values below this are rounding noise of the Jacobian's own precision.
        threshold = singular.max() * max(jacobian.shape) * torch.finfo(matrix.dtype).eps
        kept = singular > threshold
        left, singular = left[:, kept], singular[kept]
        # The SVD of the given (exact) entries runs in float64: so does its rounding.
        if _out_of_range(left.T @ pref, pref, torch.float64):
            return matrix.new_zeros(matrix.shape[0])
        coefficients = inverse_norms * (left @ ((left.T @ pref) / singular**2))
        direction = coefficients @ jacobian
        projections = (jacobian @ direction).sum()
        return _scaled(coefficients, projections, direction @ direction).to(matrix.dtype)


def _out_of_range(in_range: Tensor, pref: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``p`` has no component in the range of the unit rows (``in_range`` is that
    component, or its coordinates in an orthonormal basis), up to the rounding of ``dtype``: then no
    direction has positive cosines with every row in the preferred ratios (unit gradients that
    sum to zero, such as ``g`` and ``-2g``), and ConFIG's direction is zero, not the rescaled
    rounding noise that ``v = U⁺p`` then holds."""
    noise = pref.numel() * torch.finfo(dtype).eps * pref.norm()
    return bool(in_range.norm() <= noise)


def _inverse_norms(norms: Tensor) -> Tensor:
    """``1/‖gᵢ‖``, and 0 for zero rows, which have no direction."""
    return torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))


def _scaled(coefficients: Tensor, projections: Tensor, squared_norm: Tensor) -> Tensor:
    """The weights ``(Σᵢ gᵢᵀv / ‖v‖²) a`` of ``d`` for the direction ``v = Jᵀa``."""
    if not bool(squared_norm > 0):
        return torch.zeros_like(coefficients)
    return projections / squared_norm * coefficients
