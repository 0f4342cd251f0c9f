"""Every exported aggregation method with the traits the shared checks rely on.

The table is keyed by the names in ``jdoptim.aggregation.__all__``: a method exported without a
line here fails ``test_every_exported_method_has_traits``. One line per method, so that a change of
trait (a weighting becoming stateful, say) is a one-line edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import jdoptim.aggregation as aggregation
from jdoptim.aggregation import (
    IMTLG,
    MGDA,
    PCD,
    Aggregator,
    AlignedMTL,
    AlignedMTLWeighting,
    CAGrad,
    CAGradWeighting,
    ConFIG,
    ConFIGWeighting,
    Constant,
    ConstantWeighting,
    CRMOGMWeighting,
    DualBalancing,
    DualProj,
    DualProjWeighting,
    ExcessMTL,
    ExcessMTLWeighting,
    FairGrad,
    FairGradWeighting,
    GradDrop,
    GradNorm,
    GradNormWeighting,
    GradVac,
    GradVacWeighting,
    IMTLGWeighting,
    Krum,
    KrumWeighting,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    MoCo,
    MoDoWeighting,
    NashMTL,
    NashMTLWeighting,
    PCDWeighting,
    PCGrad,
    PCGradWeighting,
    Random,
    RandomWeighting,
    SDMGradWeighting,
    Sum,
    SumWeighting,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
    Weighting,
)
from tests.aggregation._jacobians import jacobian_from_seed

#: Exported building blocks, not methods: abstract bases and wrappers of other weightings.
BUILDING_BLOCKS = {
    "Aggregator",
    "Weighting",
    "GeneralizedWeighting",
    "WeightedAggregator",
    "GramianWeightedAggregator",
    "Flattening",
    "StateSizeError",
}


@dataclass(frozen=True)
class Traits:
    """What the shared checks may expect of a method (built by ``make(m)`` for ``m`` rows)."""

    make: Callable[[int], nn.Module]
    #: keeps state between calls (a :class:`jdoptim.Stateful`).
    stateful: bool = False
    #: needs ``J`` itself (no Gramian form): an aggregator without weighting form, or a weighting
    #: of matrices.
    full_jacobian: bool = False
    #: ``J d ≥ 0`` for every Jacobian: the direction conflicts with no row.
    non_conflicting: bool = False
    #: multiplying the input by ``s > 0`` multiplies the direction by ``s`` (weights unchanged).
    scale_invariant: bool = True
    #: autograd through the output is exact (checked with gradcheck); else the output never
    #: requires grad.
    differentiable: bool = False
    #: the fewest rows the method is defined on (1: defined on ``m = 1``).
    min_rows: int = 1
    #: the same input always gives the same output (on a fresh instance, without seeding).
    deterministic: bool = True
    #: reordering the rows leaves the direction unchanged (on a fresh instance).
    permutation_invariant: bool = True


T = Traits
_TAU = 0.3

#: One line per exported method.
TRAITS: dict[str, Traits] = {
    "Mean": T(lambda m: Mean(), differentiable=True),
    "MeanWeighting": T(lambda m: MeanWeighting(), differentiable=True),
    "Sum": T(lambda m: Sum(), differentiable=True),
    "SumWeighting": T(lambda m: SumWeighting(), differentiable=True),
    "Constant": T(lambda m: Constant(torch.arange(1.0, m + 1)), differentiable=True, permutation_invariant=False),
    "ConstantWeighting": T(lambda m: ConstantWeighting(torch.arange(1.0, m + 1)), differentiable=True, permutation_invariant=False),
    "Random": T(lambda m: Random(), differentiable=True, deterministic=False, permutation_invariant=False),
    "RandomWeighting": T(lambda m: RandomWeighting(), differentiable=True, deterministic=False, permutation_invariant=False),
    "UPGrad": T(lambda m: UPGrad(), stateful=True, non_conflicting=True),
    "UPGradWeighting": T(lambda m: UPGradWeighting(), stateful=True, non_conflicting=True),
    # The default ridge (reg_eps=1e-4) allows conflicts of about that relative size.
    "DualProj": T(lambda m: DualProj(reg_eps=1e-8), stateful=True, non_conflicting=True),
    "DualProjWeighting": T(lambda m: DualProjWeighting(reg_eps=1e-8), stateful=True, non_conflicting=True),
    "MGDA": T(lambda m: MGDA(), non_conflicting=True),
    "MGDAWeighting": T(lambda m: MGDAWeighting(), non_conflicting=True),
    "PCGrad": T(lambda m: PCGrad(), differentiable=True, deterministic=False, permutation_invariant=False),
    "PCGradWeighting": T(lambda m: PCGradWeighting(), differentiable=True, deterministic=False, permutation_invariant=False),
    "IMTLG": T(lambda m: IMTLG(), differentiable=True),
    "IMTLGWeighting": T(lambda m: IMTLGWeighting(), differentiable=True),
    "Krum": T(lambda m: Krum(n_byzantine=1, n_selected=2), differentiable=True, min_rows=4),
    "KrumWeighting": T(lambda m: KrumWeighting(n_byzantine=1, n_selected=2), differentiable=True, min_rows=4),
    "TrimmedMean": T(lambda m: TrimmedMean(trim_number=1), full_jacobian=True, differentiable=True, min_rows=3),
    "AlignedMTL": T(lambda m: AlignedMTL(), differentiable=True),
    "AlignedMTLWeighting": T(lambda m: AlignedMTLWeighting(), differentiable=True),
    "CAGrad": T(lambda m: CAGrad(c=0.5)),
    "CAGradWeighting": T(lambda m: CAGradWeighting(c=0.5)),
    "ConFIG": T(lambda m: ConFIG(), differentiable=True),
    "ConFIGWeighting": T(lambda m: ConFIGWeighting(), differentiable=True),
    "GradDrop": T(lambda m: GradDrop(), full_jacobian=True, differentiable=True, deterministic=False, permutation_invariant=False),
    "NashMTL": T(lambda m: NashMTL(), stateful=True, non_conflicting=True, scale_invariant=False),
    "NashMTLWeighting": T(lambda m: NashMTLWeighting(), stateful=True, non_conflicting=True, scale_invariant=False),
    "FairGrad": T(lambda m: FairGrad(alpha=1.0), non_conflicting=True, scale_invariant=False),
    "FairGradWeighting": T(lambda m: FairGradWeighting(alpha=1.0), non_conflicting=True, scale_invariant=False),
    "SDMGradWeighting": T(lambda m: SDMGradWeighting(lr=0.5), stateful=True),
    "MoDoWeighting": T(lambda m: MoDoWeighting(), stateful=True, scale_invariant=False),
    "GradVac": T(lambda m: GradVac(), stateful=True, scale_invariant=False, deterministic=False, permutation_invariant=False),
    "GradVacWeighting": T(lambda m: GradVacWeighting(), stateful=True, scale_invariant=False, deterministic=False, permutation_invariant=False),
    "PCD": T(lambda m: PCD(tau=_TAU), stateful=True, scale_invariant=False, permutation_invariant=False),
    "PCDWeighting": T(lambda m: PCDWeighting(tau=_TAU), stateful=True, scale_invariant=False, permutation_invariant=False),
    "ExcessMTL": T(lambda m: ExcessMTL(), stateful=True, full_jacobian=True),
    "ExcessMTLWeighting": T(lambda m: ExcessMTLWeighting(), stateful=True, full_jacobian=True),
    "CRMOGMWeighting": T(lambda m: CRMOGMWeighting(MGDAWeighting(), alpha=0.5), stateful=True, non_conflicting=True),
    "MoCo": T(lambda m: MoCo(), stateful=True, full_jacobian=True, scale_invariant=False),
    "GradNorm": T(lambda m: GradNorm(), stateful=True, scale_invariant=False, differentiable=True),
    "GradNormWeighting": T(lambda m: GradNormWeighting(), stateful=True, scale_invariant=False, differentiable=True),
    "DualBalancing": T(lambda m: DualBalancing(), stateful=True, full_jacobian=True),
}  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    traits: Traits

    def make(self, rows: int) -> nn.Module:
        return self.traits.make(rows)

    @property
    def is_aggregator(self) -> bool:
        return isinstance(self.make(max(self.traits.min_rows, 2)), Aggregator)

    @property
    def input_kind(self) -> str:
        """``"jacobian"`` for aggregators, else the weighting's ``input_kind``."""
        method = self.make(max(self.traits.min_rows, 2))
        return method.input_kind if isinstance(method, Weighting) else "jacobian"

    def input_of(self, jacobian: Tensor, other: Tensor | None = None) -> Tensor:
        """What the method takes for the Jacobian ``J`` (``other``: an independent batch's)."""
        kind = self.input_kind
        if kind == "jacobian" or kind == "matrix":
            return jacobian
        if kind == "gramian":
            return jacobian @ jacobian.T
        second = jacobian.flip(1) if other is None else other
        return jacobian @ second.T

    def __str__(self) -> str:
        return self.name


def exported_methods() -> list[str]:
    return sorted(set(aggregation.__all__) - BUILDING_BLOCKS)


METHODS = [Method(name, TRAITS[name]) for name in sorted(TRAITS)]
METHOD_IDS = [method.name for method in METHODS]


def sample_jacobian(
    method: Method, dtype: torch.dtype = torch.float64, cols: int = 7, seed: int = 3
) -> Tensor:
    """A conflicting ``[max(min_rows, 5), cols]`` Jacobian of rank 4."""
    return jacobian_from_seed(seed, max(method.traits.min_rows, 5), cols, rank=4, dtype=dtype)
