"""Scalarizers across ranks: the global losses, this rank's part carrying the graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim.distributed._layout import StepKind, layout_of, same_shapes, shapes_of
from jdoptim.distributed._path_base import DistributedPath, FailedPart, losses_of
from jdoptim.paths import GradsPart, LossesPart, Part, ScalarizerPath, StepRecord


class DistributedScalarizerPath(DistributedPath):
    """Scalarizers see the global losses, with this rank's part carrying the graph."""

    local: ScalarizerPath

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        if losses.ndim == 0:
            return self.local.differentiate(losses, features, scale)
        return LossesPart(losses.detach(), losses, scale=scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        if len(parts) == 1:
            return parts[0]
        raise ValueError(
            "Gradient accumulation with a scalarizer is not supported in distributed steps; "
            "take one backward() per step."
        )

    def apply_across(self, part: Part) -> StepRecord:
        comm = self.communicator
        headers = self.exchange_header(StepKind.SCALARIZER, losses_of(part))
        shapes = shapes_of(headers)
        if isinstance(part, GradsPart) or not shapes[0]:
            return self.scalar_step(part)
        assert isinstance(part, LossesPart | FailedPart)
        graph = part.graph_losses if isinstance(part, LossesPart) else part.losses
        if self.context.batch_dim is None:
            same_shapes(shapes, "Every rank must return the same number of task losses")
            (total,) = comm.all_reduce_sum([part.losses], kind="losses")
            mean = total / self.world_size
            # Exactly the mean's value on every rank, with this rank's gradient (1 / R).
            self.scalarized_backward(
                lambda: mean + (graph - graph.detach()) / self.world_size, part.scale
            )
            return StepRecord(mean)
        layout = layout_of(shapes, self.context.batch_dim, comm.rank)
        assert layout is not None
        (values,) = comm.all_reduce_sum([layout.place(part.losses)], kind="losses")

        def global_losses() -> Tensor:
            before = values.narrow(layout.dim, 0, layout.offset)
            end = layout.offset + layout.size
            after = values.narrow(layout.dim, end, values.shape[layout.dim] - end)
            return torch.cat([before, graph, after], dim=layout.dim)

        self.scalarized_backward(global_losses, part.scale)
        return StepRecord(values)

    def scalarized_backward(self, global_losses: Callable[[], Tensor], scale: float) -> None:
        """Adds the gradient of the scalarized ``global_losses()`` to ``.grad``: each rank's part
        (the others' losses are constants), summed over the ranks."""
        params = self.context.params()
        self.take_grads(params)
        with self.communicator.guard("the scalarized backward"):
            torch.autograd.backward(self.module(global_losses()) * scale)
        if self.communicator.rank != 0:
            # A learnable scalarizer's own parameters (UW's) get their whole gradient on every
            # rank (it sees the global losses): the sum keeps rank 0's.
            for param in self.module.parameters():
                param.grad = None
        self.reduce_grads(params)
