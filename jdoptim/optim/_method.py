"""Resolves what the user asked for (weighting, aggregator or scalarizer) into one computation path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from jdoptim.aggregation import (
    Aggregator,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    UPGradWeighting,
    Weighting,
)

Path = Literal["gramian", "jacobian", "cross_gramian", "scalarizer"]


@dataclass(frozen=True)
class Method:
    """The object that turns losses into ``.grad`` and the path it takes.

    * ``"gramian"``: weights from the Gramian (autogram engine, or autojac in MTL mode).
    * ``"jacobian"``: an aggregator or matrix weighting that needs the whole Jacobian (autojac).
    * ``"cross_gramian"``: a weighting of ``J₁ J₂ᵀ`` from two independent batches (SDMGrad, MoDo);
      the closure is called three times per step.
    * ``"scalarizer"``: losses are combined into one scalar and backpropagated once.
    """

    module: nn.Module
    path: Path

    @property
    def batches_per_step(self) -> int:
        return 3 if self.path == "cross_gramian" else 1


def resolve_method(
    weighting: Weighting | GeneralizedWeighting | None,
    aggregator: Aggregator | None,
    scalarizer: nn.Module | None,
) -> Method:
    """Checks that at most one method is given and picks its path; the default is UPGrad."""
    given = [m for m in (weighting, aggregator, scalarizer) if m is not None]
    if len(given) > 1:
        raise ValueError(
            "Give at most one of weighting=, aggregator= and scalarizer= (they are alternative ways "
            "to combine the losses)."
        )
    if scalarizer is not None:
        if not isinstance(scalarizer, nn.Module) or not callable(scalarizer):
            raise TypeError(f"scalarizer must be a Scalarizer module, got {scalarizer!r}.")
        return Method(scalarizer, "scalarizer")
    if aggregator is not None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}.")
        if isinstance(aggregator, GramianWeightedAggregator):
            return Method(aggregator.weighting, "gramian")
        return Method(aggregator, "jacobian")
    if weighting is None:
        return Method(UPGradWeighting(), "gramian")
    if isinstance(weighting, GeneralizedWeighting):
        return Method(weighting, "gramian")
    if not isinstance(weighting, Weighting):
        raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}.")
    if weighting.input_kind == "gramian":
        return Method(weighting, "gramian")
    if weighting.input_kind == "cross_gramian":
        return Method(weighting, "cross_gramian")
    return Method(weighting, "jacobian")
