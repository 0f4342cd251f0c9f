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
from jdoptim.aggregation.constant import Constant, ConstantWeighting
from jdoptim.aggregation.dualproj import DualProj, DualProjWeighting
from jdoptim.aggregation.mean import Mean, MeanWeighting
from jdoptim.aggregation.mgda import MGDA, MGDAWeighting
from jdoptim.aggregation.random import Random, RandomWeighting
from jdoptim.aggregation.sum import Sum, SumWeighting
from jdoptim.aggregation.upgrad import UPGrad, UPGradWeighting

__all__ = [
    "MGDA",
    "Aggregator",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GramianWeightedAggregator",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "Random",
    "RandomWeighting",
    "Sum",
    "SumWeighting",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]
