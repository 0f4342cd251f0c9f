"""jdoptim: Jacobian descent for PyTorch, as torch.optim optimizers.

Layers: :mod:`jdoptim.linalg` (Gramians, solvers), :mod:`jdoptim.aggregation` (weightings and
aggregators), :mod:`jdoptim.autojac` (Jacobians through autograd), :mod:`jdoptim.autogram` (the
Gramian engine) and :mod:`jdoptim.optim` (the optimizers).
"""

from jdoptim import aggregation, autogram, autojac, distributed, linalg, optim, scalarization
from jdoptim._stateful import Stateful
from jdoptim._step_info import StepAware, StepInfo
from jdoptim.autojac._aggregated_backward import backward
from jdoptim.optim import JDSGD, JacobianDescent, JDAdam, JDAdamW

__version__ = "0.1.0"

__all__ = [
    "JDSGD",
    "JDAdam",
    "JDAdamW",
    "JacobianDescent",
    "Stateful",
    "StepAware",
    "StepInfo",
    "__version__",
    "aggregation",
    "autogram",
    "autojac",
    "backward",
    "distributed",
    "linalg",
    "optim",
    "scalarization",
]
