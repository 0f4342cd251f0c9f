"""Full-Jacobian methods, and Gramian weightings on per-task losses, across ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.autogram import instance_major_order
from jdoptim.distributed._layout import Layout, StepKind, header, same_shapes, shapes_of
from jdoptim.distributed._path_base import DistributedPath, losses_of, overflow_as_nan
from jdoptim.paths import (
    GradsPart,
    JacobianPath,
    NonFiniteGramianError,
    Part,
    RowsPart,
    StepRecord,
)


class DistributedJacobianPath(DistributedPath):
    """Full-Jacobian methods, and Gramian weightings on per-task losses."""

    local: JacobianPath

    def apply_across(self, part: Part) -> StepRecord:
        if self.context.batch_dim is None:
            return self._tasks(part)
        comm = self.communicator
        losses = losses_of(part)
        tensors: list[Tensor] = []
        dims: list[int] = []
        if isinstance(part, RowsPart):
            dim = self.context.batch_dim % part.losses.ndim
            order = instance_major_order(tuple(part.losses.shape), dim).to(part.rows.device)
            tensors = [part.rows[order], part.losses]
            dims = [0, dim]
        layouts: list[Layout | None] = []
        gathered = comm.all_gather_padded(
            tensors,
            dims,
            header=header(StepKind.JACOBIAN, losses, method=self.method_code),
            check=lambda h: layouts.append(self.layout(h)),
        )
        layout = layouts[0]
        if layout is None:
            return self.scalar_step(part)
        global_rows, global_losses = gathered
        direction = global_rows.new_zeros(global_rows.shape[1])
        weights: Tensor | None = None
        with comm.guard("the aggregation"):
            natural = torch.empty_like(global_rows)
            natural[instance_major_order(layout.shape, layout.dim).to(natural.device)] = global_rows
            try:
                direction, weights = self.local.direction(RowsPart(global_losses, natural))
            except NonFiniteGramianError:
                direction = overflow_as_nan(direction)
        self.set_direction(direction, part.scale)
        return StepRecord(global_losses, weights)

    def _tasks(self, part: Part) -> StepRecord:
        """Per-task losses: the ``[T, n]`` Jacobians are averaged over the ranks (all-reduce)."""
        if isinstance(part, GradsPart):
            return self._task_grads(part)
        rows = part.rows if isinstance(part, RowsPart) else torch.zeros(0)
        mean_rows, mean_losses = self.task_means(part, StepKind.TASKS, [rows])
        direction = mean_rows.new_zeros(mean_rows.shape[-1] if mean_rows.ndim else 0)
        weights: Tensor | None = None
        with self.communicator.guard("the aggregation"):
            try:
                direction, weights = self.local.direction(RowsPart(mean_losses, mean_rows))
            except NonFiniteGramianError:
                direction = overflow_as_nan(direction)
        self.set_direction(direction, part.scale)
        return StepRecord(mean_losses, weights)

    def _task_grads(self, part: GradsPart) -> StepRecord:
        shapes = shapes_of(self.exchange_header(StepKind.TASKS, part.losses))
        same_shapes(shapes, "Every rank must return the same number of task losses")
        params = self.context.params()
        self.take_grads(params)
        with self.communicator.guard("the backward"):
            self.local.apply(part)
        (total,) = self.reduce_grads(params, [part.losses], scale=1 / self.world_size)
        return StepRecord(total, part.weights)
