"""The distributed variant of each path: the local path's work, plus the exchanges between ranks.

With ``R`` ranks and a ``batch_dim``, rank ``r``'s losses are its slice of the global losses,
concatenated along ``batch_dim`` in rank order. Without ``batch_dim`` (and in multi-task mode)
the losses are per task: the global loss of task ``t`` is the mean over ranks of the per-rank
losses (each the mean over an equally sized local batch, as DDP assumes). Every rank computes the
same global Gramian (or Jacobian), rank 0's weights are shared so that every rank applies
bit-identical values, each rank builds the gradient of its own losses under its slice of the
weights, and one all-reduce sums them. Every exchange starts with a header of the same length,
and failures ride in the next collective, so a failing rank makes every rank raise, never hang.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jdoptim.autogram import Term
from jdoptim.distributed._communicator import Communicator, from_first_rank
from jdoptim.distributed._layout import (
    Layout,
    StepKind,
    header,
    layout_of,
    same_shapes,
    shapes_of,
)
from jdoptim.paths import (
    GradsPart,
    GramianPath,
    JacobianPath,
    LossesPart,
    MultiTaskPath,
    Part,
    Path,
    RowsPart,
    ScalarizerPath,
    StepRecord,
    TasksPart,
    TermsPart,
    add_direction,
    placeholder_gramian,
    weights_for,
)


@dataclass
class FailedPart(Part):
    """What a rank whose local work failed brings to the exchanges (the error rides along)."""


class DistributedPath(Path):
    """A local path run across the ranks of a process group."""

    def __init__(self, local: Path, group: dist.ProcessGroup) -> None:
        super().__init__(local.method, local.context)
        self.local = local
        self.communicator = Communicator(group)
        self._stash: list[tuple[Tensor, Tensor | None]] | None = None

    @property
    def bytes_sent(self) -> dict[str, int]:
        """Bytes this rank sent in the last step, per kind of collective."""
        return dict(self.communicator.bytes_sent)

    @property
    def world_size(self) -> int:
        return self.communicator.world_size

    def forward_context(self) -> AbstractContextManager[Any]:
        return self.local.forward_context()

    def begin(self) -> None:
        self.communicator.start_step()

    def guard(self, stage: str) -> AbstractContextManager[Any]:
        return self.communicator.guard(stage)

    def run(
        self,
        losses: Tensor | None,
        features: Any,
        scale: float,
        next_losses: Callable[[], Tensor],
    ) -> StepRecord:
        if losses is None:  # the closure failed on this rank: the next exchange says so
            return self.apply(FailedPart(torch.zeros(0)))
        return self.apply(self.differentiate(losses, features, scale))

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        part: Part = FailedPart(losses.detach())
        with self.communicator.guard("the local backward"):
            part = self.local_part(losses, features, scale)
        return part

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        return self.local.differentiate(losses, features, scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        if any(isinstance(p, FailedPart) for p in parts):
            return FailedPart(parts[-1].losses)
        combined: Part = FailedPart(parts[-1].losses)
        with self.communicator.guard("combining the micro-batches"):
            combined = self.local.combine(parts)
        return combined

    def apply(self, part: Part) -> StepRecord:
        self._stash = None
        try:
            return self.apply_across(part)
        except BaseException:
            if self._stash is not None:
                for param, old in self._stash:
                    param.grad = old
            self._stash = None
            raise

    def apply_across(self, part: Part) -> StepRecord:
        raise NotImplementedError

    # --- pieces shared by the variants -----------------------------------------------------------

    def exchange_header(self, kind: StepKind, losses: Tensor | None) -> list[list[int]]:
        """Every rank's header, in an exchange as long as ``all_gather_padded``'s first one."""
        headers = self.communicator.exchange_ints([0, 0, *header(kind, losses)])
        return [h[2:] for h in headers]

    def layout(self, headers: list[list[int]]) -> Layout | None:
        return layout_of(shapes_of(headers), self.context.batch_dim, self.communicator.rank)

    def take_grads(self, params: Sequence[Tensor]) -> None:
        """Sets each ``.grad`` aside, so that the step reduces only its own part."""
        self._stash = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None

    def restore(self) -> None:
        """Adds the gradients set aside back (they were there before the step)."""
        if self._stash is not None:
            for param, old in self._stash:
                if old is not None:
                    param.grad = old if param.grad is None else param.grad + old
        self._stash = None

    def reduce_grads(
        self, params: Sequence[Tensor], extra: Sequence[Tensor] = (), scale: float = 1.0
    ) -> list[Tensor]:
        """Sums every rank's gradients (and ``extra``) in one all-reduce; returns ``extra``'s sums."""
        grads = [_or_zeros(p.grad, p) for p in params]
        reduced = self.communicator.all_reduce_sum([*grads, *extra], kind="gradients")
        for param, grad in zip(params, reduced[: len(params)], strict=True):
            param.grad = grad if scale == 1.0 else grad * scale
        self.restore()
        return [total * scale for total in reduced[len(params) :]]

    def scalar_step(self, part: Part) -> StepRecord:
        """Scalar losses: each rank's gradient, averaged over the ranks as DDP does."""
        params = self.context.params()
        self.take_grads(params)
        with self.communicator.guard("the backward of the scalar loss"):
            assert isinstance(part, GradsPart)
            self.local.apply(part)
        (total,) = self.reduce_grads(params, [part.losses], scale=1 / self.world_size)
        return StepRecord(total)

    def set_direction(self, direction: Tensor) -> None:
        """Adds rank 0's ``direction`` to ``.grad``, the same on every rank."""
        (shared,) = self.communicator.all_reduce_sum(
            [from_first_rank(direction, self.communicator.rank)], kind="direction"
        )
        add_direction(self.context.params(), shared)

    def task_means(self, part: Part, kind: StepKind, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every rank's ``tensors`` and losses averaged over the ranks (per-task losses)."""
        shapes = shapes_of(self.exchange_header(kind, _losses_of(part)))
        same_shapes(
            shapes,
            "Without batch_dim the losses are per task, averaged over the ranks: every rank must "
            "return the same number of them (pass batch_dim= for per-instance losses)",
        )
        totals = self.communicator.all_reduce_sum([*tensors, part.losses], kind="jacobian")
        return [total / self.world_size for total in totals]

    def global_losses(self, losses: Tensor) -> Tensor:
        comm = self.communicator
        comm.start_step()
        layout = None
        if self.context.batch_dim is not None and self.context.shared_params is None:
            layout = self.layout(self.exchange_header(StepKind.EVALUATE, losses))
        if layout is None:
            (total,) = comm.all_reduce_sum([losses.detach()], kind="losses")
            return total / self.world_size
        (values,) = comm.all_reduce_sum([layout.place(losses)], kind="losses")
        return values


class DistributedGramianPath(DistributedPath):
    """Instance-wise Gramian weightings: gathered term factors give the global Gramian."""

    local: GramianPath

    def apply_across(self, part: Part) -> StepRecord:
        if isinstance(part, LossesPart):
            return self._shape_weights(part)
        comm = self.communicator
        kind = StepKind.ENGINE if not isinstance(part, LossesPart) else StepKind.WEIGHTS
        losses = _losses_of(part)
        factors: list[Tensor] = []
        dims: list[int] = []
        if isinstance(part, TermsPart):
            for term in part.terms:
                for tensor, dim in term.factors():
                    factors.append(tensor)
                    dims.append(dim)
        layouts: list[Layout | None] = []
        gathered = comm.all_gather_padded(
            factors,
            dims,
            header=header(kind, losses),
            check=lambda h: layouts.append(self.layout(h)),
        )
        layout = layouts[0]
        if layout is None:
            return self.scalar_step(part)
        assert isinstance(part, TermsPart)
        global_terms = _rebuild(part, gathered)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        weights = part.losses.new_zeros(layout.shape, dtype=dtype)
        gramian = weights.new_zeros(())
        with comm.guard("the weighting"):
            gramian = self.local.gramian(global_terms, layout.shape, part.scale)
            weights = weights_for(self.local.weighting, gramian).to(dtype)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(part.losses.to(dtype))],
            kind="weights",
        )
        params = self.context.params()
        self.take_grads(params)
        with comm.guard("the local gradients"):
            local = layout.local_slice(weights).to(part.losses.dtype)
            self.local.write_grad(part, local)
        self.reduce_grads(params)
        final = gramian
        return StepRecord(global_losses.to(part.losses.dtype), weights, _gramian=lambda: final)

    def _shape_weights(self, part: LossesPart) -> StepRecord:
        """Weightings that ignore the Gramian: the global shape is all they need."""
        comm = self.communicator
        layout = self.layout(self.exchange_header(StepKind.WEIGHTS, part.losses))
        if layout is None:
            return self.scalar_step(part)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        weights = part.losses.new_zeros(layout.shape, dtype=dtype)
        with comm.guard("the weighting"):
            weights = weights_for(
                self.local.weighting, placeholder_gramian(part.losses.new_zeros(layout.shape))
            ).to(dtype)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(part.losses.to(dtype))],
            kind="weights",
        )
        params = self.context.params()
        self.take_grads(params)
        with comm.guard("the local gradients"):
            local = layout.local_slice(weights).to(part.graph_losses.dtype)
            torch.autograd.backward(part.graph_losses, local)
        self.reduce_grads(params)
        return StepRecord(global_losses.to(part.losses.dtype), weights)

    def combine(self, parts: Sequence[Part]) -> Part:
        return super().combine(parts)


class DistributedJacobianPath(DistributedPath):
    """Full-Jacobian methods, and Gramian weightings on per-task losses."""

    local: JacobianPath

    def apply_across(self, part: Part) -> StepRecord:
        if self.context.batch_dim is None:
            return self._tasks(part)
        comm = self.communicator
        losses = _losses_of(part)
        tensors: list[Tensor] = []
        dims: list[int] = []
        if isinstance(part, RowsPart):
            dim = part.losses.ndim and self.context.batch_dim % part.losses.ndim
            order = torch.arange(part.losses.numel()).reshape(part.losses.shape).movedim(dim, 0)
            tensors = [part.rows[order.reshape(-1).to(part.rows.device)], part.losses]
            dims = [0, dim]
        layouts: list[Layout | None] = []
        gathered = comm.all_gather_padded(
            tensors,
            dims,
            header=header(StepKind.JACOBIAN, losses),
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
            natural[layout.natural_order(global_rows.device)] = global_rows
            direction, weights = self.local.direction(RowsPart(global_losses, natural))
        self.set_direction(direction)
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
            direction, weights = self.local.direction(RowsPart(mean_losses, mean_rows))
        self.set_direction(direction)
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
            grads = [_or_zeros(head_grads.get(id(p)), p) for p in heads]
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
            weights = self.local.aggregate(shared, mean_jacobians)
            directions = [_or_zeros(p.grad, p) for p in shared]
        synced = comm.all_reduce_sum(
            [from_first_rank(d, comm.rank) for d in directions], kind="direction"
        )
        for param, direction in zip(shared, synced, strict=True):
            param.grad = direction * part.scale if part.scale != 1.0 else direction
        self.restore()
        for param, grad in zip(heads, mean_grads, strict=True):
            grad = grad * part.scale if part.scale != 1.0 else grad
            param.grad = grad if param.grad is None else param.grad + grad
        return StepRecord(mean_losses, weights)


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
        headers = self.exchange_header(StepKind.SCALARIZER, _losses_of(part))
        shapes = shapes_of(headers)
        if isinstance(part, GradsPart) or not shapes[0]:
            return self.scalar_step(part)
        assert isinstance(part, LossesPart | FailedPart)
        graph = part.graph_losses if isinstance(part, LossesPart) else part.losses
        params = self.context.params()
        if self.context.batch_dim is None:
            same_shapes(shapes, "Every rank must return the same number of task losses")
            (total,) = comm.all_reduce_sum([part.losses], kind="losses")
            mean = total / self.world_size
            self.take_grads(params)
            with comm.guard("the scalarized backward"):
                # Exactly the mean's value on every rank, with this rank's gradient (1 / R).
                global_losses = mean + (graph - graph.detach()) / self.world_size
                torch.autograd.backward(self.module(global_losses) * part.scale)
            self.reduce_grads(params)
            return StepRecord(mean)
        layout = layout_of(shapes, self.context.batch_dim, comm.rank)
        assert layout is not None
        (values,) = comm.all_reduce_sum([layout.place(part.losses)], kind="losses")
        self.take_grads(params)
        with comm.guard("the scalarized backward"):
            before = values.narrow(layout.dim, 0, layout.offset)
            end = layout.offset + layout.size
            after = values.narrow(layout.dim, end, values.shape[layout.dim] - end)
            global_losses = torch.cat([before, graph, after], dim=layout.dim)
            torch.autograd.backward(self.module(global_losses) * part.scale)
        self.reduce_grads(params)
        return StepRecord(values)


def distributed_variant(local: Path, group: dist.ProcessGroup) -> DistributedPath:
    """The distributed variant of ``local`` over ``group``."""
    if not dist.is_initialized():
        raise ValueError(
            "A distributed step needs torch.distributed to be initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
        )
    variants: list[tuple[type[Path], type[DistributedPath]]] = [
        (GramianPath, DistributedGramianPath),
        (MultiTaskPath, DistributedMultiTaskPath),
        (ScalarizerPath, DistributedScalarizerPath),
        (JacobianPath, DistributedJacobianPath),
    ]
    for local_type, variant in variants:
        if isinstance(local, local_type):
            return variant(local, group)
    raise ValueError(
        f"Cross-Gramian weightings such as {local.module!r} are not supported in distributed "
        "steps: they need three independent global batches per step. Pass process_group=False "
        "for local steps on each rank."
    )


def _rebuild(part: TermsPart, gathered: list[Tensor]) -> list[Term]:
    """The part's terms around the gathered (global) factors."""
    remaining = iter(gathered)
    terms = []
    for term in part.terms:
        count = len(term.factors())
        terms.append(term.with_factors([next(remaining) for _ in range(count)]))
    return terms


def _losses_of(part: Part) -> Tensor | None:
    return None if isinstance(part, FailedPart) else part.losses


def _or_zeros(tensor: Tensor | None, like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_zeros(like.shape)
