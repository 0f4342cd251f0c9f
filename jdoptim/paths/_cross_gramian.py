"""The cross-Gramian path (SDMGrad, MoDo): weights of ``J₁ J₂ᵀ`` from two independent batches.

The closure is called three times per step, once per batch: two Jacobians for the weights, a
third batch for the direction, so that the weights and the direction are independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor

from jdoptim.autojac import jac
from jdoptim.paths._base import Part, Path
from jdoptim.paths._record import StepRecord

LossesFn = Callable[[], Tensor]


class CrossGramianPath(Path):
    """Weightings of a cross-Gramian; only ``step(closure)`` can draw the three batches."""

    def supports_backward(self) -> bool:
        return False

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        self._needs_the_closure()

    def combine(self, parts: Sequence[Part]) -> Part:
        self._needs_the_closure()

    def apply(self, part: Part) -> StepRecord:
        self._needs_the_closure()

    def _needs_the_closure(self) -> NoReturn:
        raise TypeError(
            f"{self.module!r} weighs the cross-Gramian of two independent batches and then uses a "
            "third one, so it needs the closure: optimizer.step(closure), with a closure that "
            "draws the next batch at each call (backward-then-step cannot draw batches)."
        )

    def run(self, losses: Tensor, features: Any, scale: float, next_losses: LossesFn) -> StepRecord:
        """The whole step: ``losses`` from the first batch, ``next_losses`` draws the others."""
        params = self.context.params()
        jacobians = []
        for batch in range(2):
            if batch > 0:
                losses = next_losses()
            rows = jac(
                losses.reshape(-1), params, parallel_chunk_size=self.context.parallel_chunk_size
            )
            jacobians.append(torch.cat([j.reshape(len(j), -1) for j in rows], dim=1))
        cross_gramian = jacobians[0] @ jacobians[1].T
        weights = self.module(cross_gramian)
        losses = next_losses()
        if losses.shape != weights.shape:
            raise ValueError(
                f"The closure returned losses of shape {tuple(losses.shape)} for the third batch but "
                f"{tuple(weights.shape)} for the first two; every batch of a step must give the same "
                "number of losses."
            )
        torch.autograd.backward(losses, weights)
        return StepRecord(losses.detach(), weights, _gramian=lambda: cross_gramian)
