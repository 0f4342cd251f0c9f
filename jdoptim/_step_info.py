"""What an optimizer tells a method after each step, for methods whose state follows training.

The peers make users call such methods by hand (FAMO's post-step loss update, DWA's per-epoch
update, CR-MOGM's alpha following the learning rate). Here a weighting, aggregator or scalarizer
that defines ``after_step(info: StepInfo) -> None`` is called by the jdoptim optimizers once the
inner optimizer has updated the parameters, so the user's loop stays ``optimizer.step(closure)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class StepInfo:
    """Facts about the step that just happened.

    Attributes:
        losses: the detached losses the step was computed from (the closure's output).
        lr: learning rate of the first parameter group when the step was taken.
        step: number of steps taken so far, this one included (1 after the first step).
        evaluate: re-runs the closure without gradients at the updated parameters and returns the
            detached losses (same batch as ``losses`` when the closure is deterministic). Costs one
            forward pass; only methods that need it (such as FAMO) should call it.
    """

    losses: Tensor
    lr: float
    step: int
    evaluate: Callable[[], Tensor]


@runtime_checkable
class StepAware(Protocol):
    """A method with state that follows the optimizer's steps."""

    def after_step(self, info: StepInfo) -> None: ...
