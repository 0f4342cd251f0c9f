"""Every exported scalarizer with the traits the shared checks rely on (one line per method).

Keyed by the names in ``jdoptim.scalarization.__all__``: a scalarizer exported without a line here
fails ``test_every_exported_scalarizer_has_traits``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import jdoptim.scalarization as scalarization
from jdoptim.scalarization import (
    COSMOS,
    DBMTL,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    UW,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Sum,
)

Shape = tuple[int, ...]
#: Exported building blocks, not methods.
BUILDING_BLOCKS = {"Scalarizer", "PreferenceScalarizer"}


@dataclass(frozen=True)
class Traits:
    """What the shared checks may expect of a scalarizer built by ``make(shape)``."""

    make: Callable[[Shape], nn.Module]
    #: keeps state between calls (a :class:`jdoptim.Stateful`).
    stateful: bool = False
    #: only defined on non-negative losses (takes their logarithm).
    positive_losses: bool = False
    #: defined on losses equal to 0.
    zero_losses: bool = True
    #: autograd through the result is the derivative of the value (gradcheck). FAMO holds its
    #: normaliser constant on purpose, as the paper does.
    exact_gradient: bool = True
    #: the same losses always give the same value.
    deterministic: bool = True


T = Traits


def _preference(shape: Shape) -> torch.Tensor:
    return torch.arange(1.0, 1.0 + torch.Size(shape).numel()).reshape(shape)


#: One line per exported scalarizer.
TRAITS: dict[str, Traits] = {
    "Mean": T(lambda shape: Mean()),
    "Sum": T(lambda shape: Sum()),
    "Constant": T(lambda shape: Constant(_preference(shape))),
    "Random": T(lambda shape: Random(), deterministic=False),
    "GeometricMean": T(lambda shape: GeometricMean(), positive_losses=True, zero_losses=False),
    "STCH": T(lambda shape: STCH(0.5, weights=_preference(shape))),
    "PBI": T(lambda shape: PBI(5.0, _preference(shape))),
    "COSMOS": T(lambda shape: COSMOS(0.5, _preference(shape))),
    "DBMTL": T(lambda shape: DBMTL(), positive_losses=True),
    "UW": T(lambda shape: UW(shape), stateful=True),
    "IMTLL": T(lambda shape: IMTLL(shape), stateful=True),
    "DWA": T(lambda shape: DWA(steps_per_epoch=1), stateful=True),
    "FAMO": T(lambda shape: FAMO(shape), stateful=True, positive_losses=True, exact_gradient=False),
}  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    traits: Traits

    def make(self, shape: Shape) -> nn.Module:
        return self.traits.make(shape)

    def __str__(self) -> str:
        return self.name


def exported_scalarizers() -> list[str]:
    return sorted(set(scalarization.__all__) - BUILDING_BLOCKS)


METHODS = [Method(name, TRAITS[name]) for name in sorted(TRAITS)]
METHOD_IDS = [method.name for method in METHODS]
