"""``StepRecord``: what one Jacobian-descent step computed, for logging and checks.

Filled by every path from values the step computes anyway (no extra backward pass). The summary
statistics are computed on first access, so a loop that never reads them pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from jdoptim.linalg import flatten_generalized_gramian


@dataclass
class StepRecord:
    """The losses, weights and (when one was computed) Gramian of the last step.

    Attributes:
        losses: the detached losses of the step (every rank's, in distributed mode; every
            micro-batch's, concatenated along the instance dim or summed per task, after
            gradient accumulation).
        weights: the weights ``w`` of the direction ``d = Σᵢ wᵢ ∇ℓᵢ`` in the losses' shape, or
            ``None`` when the method gives no weights (a scalarizer, a non-weighted aggregator).
        finite: ``False`` when the Gramian or the direction was not finite (under loss scaling,
            such a step is skipped by the ``GradScaler``).
    """

    losses: Tensor
    weights: Tensor | None = None
    finite: bool = True
    _gramian: Callable[[], Tensor | None] = field(default=lambda: None, repr=False)
    _cache: dict[str, Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def gramian(self) -> Tensor | None:
        """``J Jᵀ`` of the losses (generalized: ``[*shape, *reversed(shape)]``), when available.

        Computed by the step on the Gramian paths; formed on first access from the Jacobian on the
        full-Jacobian paths; ``None`` for scalarizers and scalar losses.
        """
        if "gramian" not in self._cache:
            self._cache["gramian"] = self._gramian()
        return self._cache["gramian"]

    def _matrix(self) -> Tensor | None:
        gramian = self.gramian
        if gramian is None or gramian.ndim < 2:
            return None
        return flatten_generalized_gramian(gramian).double()

    @property
    def conflicting_pairs(self) -> int | None:
        """How many pairs of losses have gradients with a negative inner product."""
        matrix = self._matrix()
        if matrix is None:
            return None
        return int((torch.triu(matrix, diagonal=1) < 0).sum())

    @property
    def increased_by_mean(self) -> int | None:
        """How many losses a small step along the mean gradient would increase (``gᵢ·ḡ < 0``)."""
        matrix = self._matrix()
        if matrix is None:
            return None
        return int((matrix.sum(dim=1) < 0).sum())

    @property
    def cosine_to_mean(self) -> float | None:
        """Cosine between the step direction ``Σ wᵢ gᵢ`` and the mean gradient."""
        matrix = self._matrix()
        if matrix is None or self.weights is None:
            return None
        weights = self.weights.reshape(-1).double()
        mean = torch.full_like(weights, 1.0 / weights.numel())
        dot = weights @ matrix @ mean
        norms = (weights @ matrix @ weights) * (mean @ matrix @ mean)
        if float(norms) <= 0.0:
            return 0.0
        return float(dot / norms.sqrt())

    def summary(self) -> dict[str, float | int | None]:
        """The scalars above plus the mean and max loss, for a logger or a progress bar."""
        losses = self.losses.double()
        return {
            "mean_loss": float(losses.mean()),
            "max_loss": float(losses.max()),
            "conflicting_pairs": self.conflicting_pairs,
            "increased_by_mean": self.increased_by_mean,
            "cosine_to_mean": self.cosine_to_mean,
        }
