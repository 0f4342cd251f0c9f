"""The Jacobian path: losses → Jacobian rows (autojac) → aggregator or Gramian weights → ``.grad``.

Used by aggregators that need the whole Jacobian, and by Gramian weightings on per-task losses
(no ``batch_dim``), where the ``[T, n]`` Jacobian is small. Micro-batches combine by concatenating
rows along the instance dim (``batch_dim`` given) or by summing the rows of each task (the
Jacobian of the summed task losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import (
    Aggregator,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from jdoptim.autogram import instance_major_order
from jdoptim.autojac import jac, reached_by
from jdoptim.linalg import check_finite, reshape_gramian
from jdoptim.paths._base import (
    NonFiniteGramianError,
    Part,
    Path,
    add_to_grad,
    check_same_kind,
    split_flat,
)
from jdoptim.paths._method import PathKind
from jdoptim.paths._record import StepRecord
from jdoptim.paths._weights import (
    output_of,
    placeholder_gramian,
    restarting_on_size_change,
    wants_gramian,
    weights_for,
)


@dataclass
class RowsPart(Part):
    """The ``[m, n]`` Jacobian of a batch's losses, rows in the losses' flat order.

    ``reached``: for each trainable parameter, whether the losses depend on it (empty: all do).
    The others keep ``.grad = None``, as autograd leaves it, not a zero gradient.
    """

    rows: Tensor
    reached: tuple[bool, ...] = field(default=(), kw_only=True)


class JacobianPath(Path):
    """Aggregators on the full Jacobian; Gramian weightings on per-task losses."""

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim == 0:
            return self.grads_part(losses, losses, scale)
        module = self.module
        if isinstance(module, Weighting | GeneralizedWeighting) and not wants_gramian(module):
            # Weights that depend on the shape only: one backward of the weighted losses.
            weights = weights_for(module, placeholder_gramian(losses))
            part = self.grads_part(losses, (weights.to(losses.dtype) * losses).sum(), scale)
            part.weights = weights
            return part
        reached = tuple(reached_by([losses], self.context.params()))
        rows = self.jacobian(losses, scale)
        return RowsPart(losses.detach(), rows, scale=scale, reached=reached)

    def jacobian(self, losses: Tensor, scale: float = 1.0) -> Tensor:
        """The ``[m, n]`` Jacobian of ``losses`` (flat order) w.r.t. the trainable parameters.

        Differentiated at ``scale * losses`` (float16 loss scaling), returned unscaled.
        """
        params = self.context.params()
        scaled = losses * scale if scale != 1.0 else losses
        blocks = jac(
            scaled.reshape(-1), params, parallel_chunk_size=self.context.parallel_chunk_size
        )
        rows = torch.cat([block.reshape(len(block), -1) for block in blocks], dim=1)
        return rows / scale if scale != 1.0 else rows

    def combine(self, parts: Sequence[Part]) -> Part:
        check_same_kind(parts)
        if len(parts) == 1:
            return parts[0]
        rows_parts = [p for p in parts if isinstance(p, RowsPart)]
        if not rows_parts:
            return self.combine_grads(parts)
        batch_dim = self.context.batch_dim
        if batch_dim is None:
            shapes = {tuple(p.losses.shape) for p in rows_parts}
            if len(shapes) != 1:
                raise ValueError(
                    "Without batch_dim the losses are per task and micro-batches add up: every "
                    f"backward() of a step must give the same number of them; got shapes "
                    f"{sorted(shapes)}. Pass batch_dim= for per-instance losses."
                )
            return RowsPart(
                sum((p.losses for p in rows_parts[1:]), rows_parts[0].losses),
                sum((p.rows for p in rows_parts[1:]), rows_parts[0].rows),
                scale=rows_parts[0].scale,
                reached=_any_reached(rows_parts),
            )
        return concat_rows(rows_parts, batch_dim)

    def apply(self, part: Part) -> StepRecord:
        if not isinstance(part, RowsPart):
            return self.apply_grads(part)
        direction, weights = self.direction(part)
        params = self.context.params()
        pieces = split_flat(direction * part.scale, params)
        if part.reached:
            pieces = [
                piece if hit else None for piece, hit in zip(pieces, part.reached, strict=True)
            ]
        add_to_grad(params, pieces)
        rows = part.rows
        shape = tuple(part.losses.shape)
        return StepRecord(
            part.losses,
            weights,
            _gramian=lambda: reshape_gramian(rows @ rows.T, shape),
        )

    def direction(self, part: RowsPart) -> tuple[Tensor, Tensor | None]:
        """The direction for the part's Jacobian, and its weights when the method gives them."""
        try:
            check_finite(part.rows, "The Jacobian of the losses")
        except ValueError as error:
            raise NonFiniteGramianError(str(error)) from None
        direction, weights = self._full_precision_direction(part, _full_precision(part.rows))
        return direction.to(part.rows.dtype), weights

    def _full_precision_direction(
        self, part: RowsPart, rows: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`direction` on ``rows`` (the part's, in float32 at least: a Gramian formed in
        bfloat16 is not even positive semi-definite to its own precision)."""
        module = self.module
        if self.method.kind is PathKind.GRAMIAN:
            assert isinstance(module, Weighting | GeneralizedWeighting)
            if isinstance(module, Weighting) and part.losses.ndim == 1:
                # Rescales huge or tiny Jacobians exactly before forming J Jᵀ.
                weights = GramianWeightedAggregator(module).compute_weights(rows)
            else:
                gramian = reshape_gramian(rows @ rows.T, tuple(part.losses.shape))
                weights = weights_for(module, gramian)
            return weights.reshape(-1).to(rows.dtype) @ rows, weights
        aggregator = module if isinstance(module, Aggregator) else None
        if aggregator is None:
            assert isinstance(module, Weighting)
            aggregator = WeightedAggregator(module)
        # Per-instance rows (batch_dim set): a batch of another size restarts per-instance state.
        instances = self.context.batch_dim is not None
        stateful = (
            aggregator.weighting if isinstance(aggregator, WeightedAggregator) else aggregator
        )
        if isinstance(aggregator, WeightedAggregator):
            with output_of(aggregator.weighting) as seen:
                direction = restarting_on_size_change(
                    stateful, lambda: aggregator(rows), part.losses.numel(), instances
                )
            return direction, seen[-1].reshape(part.losses.shape) if seen else None
        return restarting_on_size_change(
            stateful, lambda: aggregator(rows), part.losses.numel(), instances
        ), None


def _full_precision(rows: Tensor) -> Tensor:
    return rows if rows.dtype in (torch.float32, torch.float64) else rows.float()


def concat_rows(parts: Sequence[RowsPart], batch_dim: int) -> RowsPart:
    """The rows of the losses concatenated along ``batch_dim`` (flat order of the result)."""
    dim = batch_dim % parts[0].losses.ndim
    losses = torch.cat([p.losses for p in parts], dim=dim)
    # Instance-major, the concatenation along the instance dim is a concatenation of rows.
    major = torch.cat(
        [p.rows[instance_major_order(tuple(p.losses.shape), dim).to(p.rows.device)] for p in parts]
    )
    rows = torch.empty_like(major)
    rows[instance_major_order(tuple(losses.shape), dim).to(major.device)] = major
    return RowsPart(losses, rows, scale=parts[0].scale, reached=_any_reached(parts))


def _any_reached(parts: Sequence[RowsPart]) -> tuple[bool, ...]:
    """The parameters some micro-batch's losses depend on (empty: all)."""
    if any(not part.reached for part in parts):
        return ()
    return tuple(any(hits) for hits in zip(*(part.reached for part in parts), strict=True))
