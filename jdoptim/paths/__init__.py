"""Step paths: how each kind of method turns losses into ``.grad``, one strategy per path.

Neutral between the layers below (aggregation, autojac, autogram) and the optimizers above: a
:class:`Path` is chosen once per optimizer (:func:`make_path`) and driven the same way by
``step(closure)``, by backward-then-step with gradient accumulation, and, wrapped by
:mod:`jdoptim.distributed`, across ranks. What a path needs from its optimizer is a
:class:`StepContext`; what a step computed is a :class:`StepRecord`.
"""

from jdoptim.paths._base import (
    GradsPart,
    NonFiniteGramianError,
    Part,
    Path,
    StepContext,
    add_direction,
    add_to_grad,
)
from jdoptim.paths._cross_gramian import CrossGramianPath
from jdoptim.paths._factory import make_path
from jdoptim.paths._gramian import GramianPath, LossesPart, TermsPart, term_rows
from jdoptim.paths._losses import NonFiniteLossesError, check_losses
from jdoptim.paths._method import Method, PathKind, needs_gramian, resolve_method
from jdoptim.paths._multi_task import MultiTaskPath, TasksPart
from jdoptim.paths._record import StepRecord
from jdoptim.paths._rows import JacobianPath, RowsPart, concat_rows
from jdoptim.paths._scalarizer import ScalarizerPath
from jdoptim.paths._weights import check_gramian_finite, placeholder_gramian, weights_for

__all__ = [
    "CrossGramianPath",
    "GradsPart",
    "GramianPath",
    "JacobianPath",
    "LossesPart",
    "Method",
    "MultiTaskPath",
    "NonFiniteGramianError",
    "NonFiniteLossesError",
    "Part",
    "Path",
    "PathKind",
    "RowsPart",
    "ScalarizerPath",
    "StepContext",
    "StepRecord",
    "TasksPart",
    "TermsPart",
    "add_direction",
    "add_to_grad",
    "check_gramian_finite",
    "check_losses",
    "concat_rows",
    "make_path",
    "needs_gramian",
    "placeholder_gramian",
    "resolve_method",
    "term_rows",
    "weights_for",
]
