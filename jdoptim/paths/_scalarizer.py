"""The scalarizer path: the losses are combined into one scalar and backpropagated once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from jdoptim.paths._base import GradsPart, Part, Path, check_same_kind
from jdoptim.paths._record import StepRecord


class ScalarizerPath(Path):
    """A scalarizer from :mod:`jdoptim.scalarization`; micro-batches add their gradients, as with
    torch, except for an average of per-instance losses (``Mean`` with ``batch_dim`` set): each
    micro-batch's gradient then weighs by its share of the losses, which gives the gradient of the
    whole batch's mean (the sum would be ``k`` times it for ``k`` equal micro-batches)."""

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim == 0:
            return self.grads_part(losses, losses, scale)
        return self.grads_part(losses, self.module(losses), scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        check_same_kind(parts)
        grads_parts = [p for p in parts if isinstance(p, GradsPart)]
        averaged = getattr(self.module, "averages_losses", False)
        per_instance = self.context.batch_dim is not None and all(
            p.losses.ndim > 0 for p in grads_parts
        )
        if len(grads_parts) > 1 and averaged and per_instance:
            parts = _weighed_by_share(grads_parts)
        return self.combine_grads(parts)

    def apply(self, part: Part) -> StepRecord:
        return self.apply_grads(part)


def _weighed_by_share(parts: list[GradsPart]) -> list[GradsPart]:
    """Each part's gradients times its share ``n_k / N`` of all the parts' losses."""
    total = sum(p.losses.numel() for p in parts)
    return [
        replace(p, grads=[None if g is None else g * (p.losses.numel() / total) for g in p.grads])
        for p in parts
    ]
