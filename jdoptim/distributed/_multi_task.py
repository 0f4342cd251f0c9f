"""Multi-task mode across ranks: trunk Jacobians and head gradients averaged over the ranks."""

from __future__ import annotations

from torch import Tensor

from jdoptim.distributed._communicator import from_first_rank
from jdoptim.distributed._layout import StepKind
from jdoptim.distributed._path_base import (
    DistributedPath,
    check_shared,
    or_zeros,
    overflow_as_nan,
)
from jdoptim.paths import MultiTaskPath, NonFiniteGramianError, Part, StepRecord, TasksPart


class DistributedMultiTaskPath(DistributedPath):
    """Multi-task mode: trunk Jacobians and head gradients averaged over the ranks."""

    local: MultiTaskPath

    def apply_across(self, part: Part) -> StepRecord:
        comm = self.communicator
        params = self.context.params()
        shared = self.local.shared_params()
        shared_ids = {id(p) for p in shared}
        heads = [p for p in params if id(p) not in shared_ids]
        tasks = part.losses.numel() if isinstance(part, TasksPart) else 0
        if isinstance(part, TasksPart):
            jacobians = list(part.jacobians)
            head_grads = {id(p): g for p, g in zip(part.heads, part.head_grads, strict=True)}
            grads = [or_zeros(head_grads.get(id(p)), p) for p in heads]
        else:
            jacobians = [p.new_zeros((0,)) for p in shared]
            grads = [p.new_zeros(p.shape) for p in heads]
        *means, mean_losses = self.task_means(part, StepKind.MULTI_TASK, [*jacobians, *grads])
        mean_jacobians = [j.reshape(tasks, *p.shape) for j, p in zip(means, shared, strict=False)]
        mean_grads = means[len(shared) :]
        self.take_grads(shared)
        directions = [p.new_zeros(p.shape) for p in shared]
        weights: Tensor | None = None
        with comm.guard("the aggregation"):
            try:
                weights = self.local.aggregate(shared, mean_jacobians)
                directions = [or_zeros(p.grad, p) for p in shared]
            except NonFiniteGramianError:
                directions = [overflow_as_nan(d) for d in directions]
        synced = comm.all_reduce_sum(
            [from_first_rank(d, comm.rank) for d in directions], kind="direction"
        )
        check_shared(synced, "directions")
        for param, direction in zip(shared, synced, strict=True):
            param.grad = direction * part.scale if part.scale != 1.0 else direction
        self.restore()
        # The heads' gradients are those of the scaled losses already (the trunk's Jacobians are
        # unscaled, so that the aggregator sees the true ones).
        for param, grad in zip(heads, mean_grads, strict=True):
            param.grad = grad if param.grad is None else param.grad + grad
        return StepRecord(mean_losses, weights)
