"""Chooses the path of a method once, when the optimizer is built."""

from __future__ import annotations

from jdoptim.paths._base import Path, StepContext
from jdoptim.paths._cross_gramian import CrossGramianPath
from jdoptim.paths._gramian import GramianPath
from jdoptim.paths._method import Method, PathKind
from jdoptim.paths._multi_task import MultiTaskPath
from jdoptim.paths._rows import JacobianPath
from jdoptim.paths._scalarizer import ScalarizerPath


def make_path(method: Method, context: StepContext) -> Path:
    """The path for ``method`` with these options (checked here, before any step)."""
    if method.kind is PathKind.SCALARIZER:
        return ScalarizerPath(method, context)
    if method.kind is PathKind.CROSS_GRAMIAN:
        if context.shared_params is not None:
            raise ValueError(
                "Multi-task mode (shared_params=) does not support cross-Gramian weightings such "
                "as SDMGrad; use them on per-task losses without shared_params."
            )
        return CrossGramianPath(method, context)
    if context.shared_params is not None:
        return MultiTaskPath(method, context)
    if method.kind is PathKind.GRAMIAN and context.batch_dim is not None:
        return GramianPath(method, context)
    return JacobianPath(method, context)
