"""Aggregators (Jacobian → update direction) and weightings (Gramian or matrix → weights).

Every method whose weights depend only on the Gramian ``G = J Jᵀ`` comes in two forms: the
weighting ``XWeighting`` (usable with the autogram engine and the optimizers' fused path) and the
aggregator ``X``, a :class:`GramianWeightedAggregator` around it.
"""

from jdoptim.aggregation._bases import (
    Aggregator,
    Flattening,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from jdoptim.aggregation._state_rows import StateSizeError
from jdoptim.aggregation.aligned_mtl import AlignedMTL, AlignedMTLWeighting
from jdoptim.aggregation.cagrad import CAGrad, CAGradWeighting
from jdoptim.aggregation.config import ConFIG, ConFIGWeighting
from jdoptim.aggregation.constant import Constant, ConstantWeighting
from jdoptim.aggregation.cr_mogm import CRMOGMWeighting
from jdoptim.aggregation.dbmtl import DualBalancing
from jdoptim.aggregation.dualproj import DualProj, DualProjWeighting
from jdoptim.aggregation.excess_mtl import ExcessMTL, ExcessMTLWeighting
from jdoptim.aggregation.fairgrad import FairGrad, FairGradWeighting
from jdoptim.aggregation.graddrop import GradDrop
from jdoptim.aggregation.gradnorm import GradNorm, GradNormWeighting
from jdoptim.aggregation.gradvac import GradVac, GradVacWeighting
from jdoptim.aggregation.imtl_g import IMTLG, IMTLGWeighting
from jdoptim.aggregation.krum import Krum, KrumWeighting
from jdoptim.aggregation.mean import Mean, MeanWeighting
from jdoptim.aggregation.mgda import MGDA, MGDAWeighting
from jdoptim.aggregation.moco import MoCo
from jdoptim.aggregation.modo import MoDoWeighting
from jdoptim.aggregation.nash_mtl import NashMTL, NashMTLWeighting
from jdoptim.aggregation.pcd import PCD, PCDWeighting
from jdoptim.aggregation.pcgrad import PCGrad, PCGradWeighting
from jdoptim.aggregation.random import Random, RandomWeighting
from jdoptim.aggregation.sdmgrad import SDMGradWeighting
from jdoptim.aggregation.sum import Sum, SumWeighting
from jdoptim.aggregation.trimmed_mean import TrimmedMean
from jdoptim.aggregation.upgrad import UPGrad, UPGradWeighting

__all__ = [
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "DualBalancing",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormWeighting",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoCo",
    "MoDoWeighting",
    "NashMTL",
    "NashMTLWeighting",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "StateSizeError",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]
