"""The scalarizer path: the losses are combined into one scalar and backpropagated once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from jdoptim.paths._base import Part, Path, check_same_kind
from jdoptim.paths._record import StepRecord


class ScalarizerPath(Path):
    """A scalarizer from :mod:`jdoptim.scalarization`; micro-batches add their gradients."""

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim == 0:
            return self.grads_part(losses, losses, scale)
        return self.grads_part(losses, self.module(losses), scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        check_same_kind(parts)
        return self.combine_grads(parts)

    def apply(self, part: Part) -> StepRecord:
        return self.apply_grads(part)
