"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.linalg import normalize_gramian


class PCGradWeighting(Weighting):
    r"""Weights of PCGrad (Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020).

    Each gradient ``gᵢ`` is visited against every other gradient ``gⱼ`` in a random order; whenever
    the current ``gᵢ`` conflicts with ``gⱼ`` (negative inner product), its component along ``gⱼ`` is
    removed: ``gᵢ ← gᵢ − (gᵢ·gⱼ / ‖gⱼ‖²) gⱼ``. The projected gradients are summed. In weight space,
    ``gᵢ = cᵢᵀJ`` with ``cᵢ`` starting at ``eᵢ``, the inner products are ``cᵢᵀ G eⱼ`` and each step
    subtracts from ``cᵢ[j]``; the weights are ``w = Σᵢ cᵢ``.

    The orders are drawn from torch's global generator (``torch.manual_seed`` makes them
    reproducible), one permutation of the other gradients per gradient, as in the paper. Zero
    gradients conflict with nothing and are left alone.
    """

    differentiable = True

    scale_invariant = True

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        # The projections only depend on the direction of G; normalising keeps huge or tiny
        # Gramians away from overflow and underflow.
        matrix = normalize_gramian(gramian)
        coefficients = torch.eye(rows, dtype=gramian.dtype, device=gramian.device)
        squared_norms = matrix.diagonal()
        nonzero = squared_norms > 0
        safe_squared_norms = torch.where(nonzero, squared_norms, 1.0)
        orders = _orders_of_others(rows).to(gramian.device)
        own = torch.arange(rows, device=gramian.device)
        for others in orders.T:
            inner_products = (coefficients * matrix[others]).sum(dim=1)
            conflicts = (inner_products < 0) & nonzero[others]
            steps = torch.where(conflicts, inner_products / safe_squared_norms[others], 0.0)
            # Out of place, so that autograd can differentiate through the projections.
            coefficients = coefficients.index_put((own, others), -steps, accumulate=True)
        return coefficients.sum(dim=0)


def _orders_of_others(rows: int) -> Tensor:
    """``[rows, rows - 1]``: row ``i`` is a uniformly random permutation of ``{0..rows-1} \\ {i}``."""
    keys = torch.rand(rows, rows)
    keys.fill_diagonal_(2.0)  # above every uniform draw: i sorts last and is dropped
    return keys.argsort(dim=1)[:, : rows - 1]


class PCGrad(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`PCGradWeighting`."""

    def __init__(self) -> None:
        super().__init__(PCGradWeighting())
