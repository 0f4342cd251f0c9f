"""Resolves what the user asked for (weighting, aggregator or scalarizer) into one kind of path."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from jdoptim.aggregation import (
    Aggregator,
    Flattening,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    MeanWeighting,
    SumWeighting,
    UPGradWeighting,
    Weighting,
)


class PathKind(enum.Enum):
    """How a method turns losses into ``.grad``.

    * ``GRAMIAN``: weights from the Gramian ``J Jᵀ`` (autogram engine with a ``batch_dim``).
    * ``JACOBIAN``: an aggregator or matrix weighting that needs the whole Jacobian (autojac).
    * ``CROSS_GRAMIAN``: a weighting of ``J₁ J₂ᵀ`` from two independent batches (SDMGrad, MoDo);
      the closure is called three times per step.
    * ``SCALARIZER``: the losses are combined into one scalar and backpropagated once.
    """

    GRAMIAN = "gramian"
    JACOBIAN = "jacobian"
    CROSS_GRAMIAN = "cross_gramian"
    SCALARIZER = "scalarizer"


@dataclass(frozen=True)
class Method:
    """The module that combines the losses and the kind of path it takes."""

    module: nn.Module
    kind: PathKind

    @property
    def needs_several_losses(self) -> bool:
        """Whether the method only means something with more than one loss: not a scalarizer,
        nor the mean or sum of the losses (on one loss, torch's own step)."""
        if isinstance(self.module, MeanWeighting | SumWeighting):
            return False
        return self.kind is not PathKind.SCALARIZER


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
        if isinstance(scalarizer, Weighting | GeneralizedWeighting | Aggregator):
            kind = "aggregator" if isinstance(scalarizer, Aggregator) else "weighting"
            raise TypeError(
                f"scalarizer= got {type(scalarizer).__name__}, a {kind}: pass it as {kind}=."
            )
        if not isinstance(scalarizer, nn.Module) or not callable(scalarizer):
            raise TypeError(f"scalarizer must be a Scalarizer module, got {scalarizer!r}.")
        return Method(scalarizer, PathKind.SCALARIZER)
    if aggregator is not None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}.")
        if isinstance(aggregator, GramianWeightedAggregator):
            return Method(aggregator.weighting, PathKind.GRAMIAN)
        return Method(aggregator, PathKind.JACOBIAN)
    if weighting is None:
        return Method(UPGradWeighting(), PathKind.GRAMIAN)
    if isinstance(weighting, GeneralizedWeighting):
        return Method(weighting, PathKind.GRAMIAN)
    if not isinstance(weighting, Weighting):
        raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}.")
    if weighting.input_kind == "gramian":
        return Method(weighting, PathKind.GRAMIAN)
    if weighting.input_kind == "cross_gramian":
        return Method(weighting, PathKind.CROSS_GRAMIAN)
    return Method(weighting, PathKind.JACOBIAN)


def needs_gramian(weighting: Weighting | GeneralizedWeighting) -> bool:
    """Whether the weights depend on the Gramian's values (Mean, Sum, ... only on its shape)."""
    if isinstance(weighting, Flattening):
        return weighting.weighting.requires_values
    if isinstance(weighting, Weighting):
        return weighting.requires_values
    return True
