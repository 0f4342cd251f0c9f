"""The autogram engine: Gramians of Jacobians without the Jacobians (see ``docs/autogram.md``).

Besides :class:`Engine`, the building blocks it is made of, for code that combines Gramian passes
(micro-batches, ranks): per-parameter :class:`Term` objects (what :meth:`Engine.compute_terms`
returns), :func:`concat_terms` to join batches exactly, :func:`distinct_factors` to handle a
factor several terms share once, :func:`gramian_from_terms` and
:func:`grad_from_terms` to turn terms into the Gramian of the losses and into ``.grad``.
"""

from jdoptim.autogram._assembly import (
    grad_from_terms,
    gramian_from_terms,
    instance_major_order,
    jacobian_scale,
    scaled_gramian_from_terms,
)
from jdoptim.autogram._engine import Engine, RouteReport
from jdoptim.autogram._terms import MaterializedTerm, Route, Term, concat_terms, distinct_factors

__all__ = [
    "Engine",
    "MaterializedTerm",
    "Route",
    "RouteReport",
    "Term",
    "concat_terms",
    "distinct_factors",
    "grad_from_terms",
    "gramian_from_terms",
    "instance_major_order",
    "jacobian_scale",
    "scaled_gramian_from_terms",
]
