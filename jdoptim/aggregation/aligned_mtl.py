"""Aligned-MTL: aligns the task gradients into an orthogonal, equally scaled system."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import one_of, validators
from jdoptim.aggregation._pref import check_pref_vector, pref_weights

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


class AlignedMTLWeighting(Weighting):
    r"""Weights of Aligned-MTL (Senushkin et al., *Independent Component Alignment for Multi-Task
    Learning*, CVPR 2023, Algorithm 1).

    With the eigendecomposition ``G = V Λ Vᵀ`` restricted to the ``r`` eigenvalues above the
    numerical rank threshold, the balance matrix ``B = √λ V Λ^(-1/2) Vᵀ`` turns the rows of ``J``
    into the aligned gradients ``B J``, which are orthogonal with equal norms ``√λ``
    (``B G B = λ I`` when ``G`` has full rank). The update is ``pᵀ B J``, so the weights are
    ``w = B p``. The scale ``λ`` is the smallest kept eigenvalue (``"min"``, the paper's choice),
    their median (``"median"``) or their mean (``"rmse"``, as in the authors' code).

    Args:
        pref_vector: preference ``p`` over the aligned gradients; ``None`` means uniform ``1/m``.
        scale_mode: which eigenvalue sets the common norm of the aligned gradients.
    """

    differentiable = True

    scale_invariant = True
    pref_vector: Tensor | None

    hyper_parameters = validators(
        pref_vector=check_pref_vector,
        scale_mode=one_of("scale_mode", _SCALE_MODES),
    )

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__()
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}.")
        self.register_buffer("pref_vector", check_pref_vector(pref_vector), persistent=False)
        self.scale_mode: ScaleMode = scale_mode

    def forward(self, gramian: Tensor, /) -> Tensor:
        pref = pref_weights(self.pref_vector, gramian)
        eigenvalues, eigenvectors = torch.linalg.eigh(gramian.to(torch.float64))
        # Eigenvalues below this are rounding noise of the Gramian's own precision.
        threshold = eigenvalues[-1] * gramian.shape[0] * torch.finfo(gramian.dtype).eps
        kept = eigenvalues > threshold
        if not bool(kept.any()):
            return torch.zeros_like(pref)
        eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
        balance = (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.T * self._scale(eigenvalues)
        weights: Tensor = balance @ pref.to(torch.float64)
        return weights.to(gramian.dtype)

    def _scale(self, eigenvalues: Tensor) -> Tensor:
        if self.scale_mode == "min":
            return eigenvalues[0].sqrt()
        if self.scale_mode == "median":
            median: Tensor = eigenvalues.median()
            return median.sqrt()
        return eigenvalues.mean().sqrt()

    def _repr_args(self) -> str:
        return f"pref_vector={tensor_repr(self.pref_vector)}, scale_mode={self.scale_mode!r}"


class AlignedMTL(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`AlignedMTLWeighting` (same arguments)."""

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))
