"""Scalarizers: a tensor of losses → one scalar loss, for plain torch optimizers.

``scalarizer(losses).backward()`` then ``optimizer.step()`` with any ``torch.optim`` optimizer.
Scalarizers with state (:class:`DWA`, :class:`FAMO`, and the learnable :class:`UW`,
:class:`IMTLL`) save it in ``state_dict()``; those that learn between steps define
``after_step(info)``, which the jdoptim optimizers call after each update.
"""

from jdoptim.scalarization._bases import PreferenceScalarizer, Scalarizer
from jdoptim.scalarization.constant import Constant
from jdoptim.scalarization.cosmos import COSMOS
from jdoptim.scalarization.dbmtl import DBMTL
from jdoptim.scalarization.dwa import DWA
from jdoptim.scalarization.famo import FAMO
from jdoptim.scalarization.geometric_mean import GeometricMean
from jdoptim.scalarization.imtll import IMTLL
from jdoptim.scalarization.mean import Mean
from jdoptim.scalarization.pbi import PBI
from jdoptim.scalarization.random import Random
from jdoptim.scalarization.stch import STCH
from jdoptim.scalarization.sum import Sum
from jdoptim.scalarization.uw import UW

__all__ = [
    "COSMOS",
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "PreferenceScalarizer",
    "Random",
    "Scalarizer",
    "Sum",
]
