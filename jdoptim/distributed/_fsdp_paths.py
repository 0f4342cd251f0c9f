"""The distributed paths for ``fully_shard`` models: exact global steps, sharded ``.grad``.

Instance-wise losses (:class:`ShardedGramianPath`): the engine covers the unsharded parameters;
every rank gathers the per-layer term factors as on the DDP path, builds the global Gramian and
rank 0's weights, then, one parameter at a time, weighs its own terms into a full-size gradient
and reduce-scatters it (a sum, not FSDP2's mean): each rank keeps only its shard in ``.grad``.

Per-task losses (:class:`ShardedTaskPath`): each rank differentiates its ``T`` task losses, and a
reduce-scatter per parameter leaves each rank the shard ``J_s`` of the global ``[T, n]`` Jacobian
(the mean over ranks). ``G = Σ_s J_s J_sᵀ`` is one ``T × T`` all-reduce; each rank's shard of the
direction is ``wᵀ J_s``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import Weighting
from jdoptim.autogram import Engine
from jdoptim.distributed._communicator import from_first_rank
from jdoptim.distributed._fsdp import ShardedModel, as_sharded, sharded_rows
from jdoptim.distributed._layout import StepKind, same_shapes, shapes_of
from jdoptim.distributed._paths import (
    DistributedGramianPath,
    DistributedPath,
    FailedPart,
)
from jdoptim.linalg import reshape_gramian
from jdoptim.paths import (
    GradsPart,
    GramianPath,
    JacobianPath,
    Part,
    Path,
    StepRecord,
    TermsPart,
    check_gramian_finite,
    weights_for,
)
from jdoptim.paths._base import check_same_kind


class ShardedPath:
    """What both sharded paths share: the model, the unsharded parameters, scalar losses."""

    model: ShardedModel
    communicator: Any
    context: Any
    world_size: int

    def before_forward(self) -> None:
        """Called when a forward pass of the model starts."""

    def apply(self, part: Part) -> StepRecord:
        self.model.reshard()  # a rank whose closure failed after its forward still holds them
        return super().apply(part)  # type: ignore[misc, no-any-return]

    def unsharded(self) -> list[Tensor]:
        return [unsharded for unsharded, _ in self.model.pairs()]

    def scalar_grads(self, losses: Tensor, scale: float) -> GradsPart:
        """The local gradient of a scalar loss w.r.t. every unsharded parameter (model order)."""
        loss = losses * scale if scale != 1.0 else losses
        grads = torch.autograd.grad(loss, self.unsharded(), allow_unused=True)
        return GradsPart(losses.detach(), list(grads), scale=scale)

    def write(self, new: list[tuple[Any, Tensor]]) -> None:
        """After a last failure check, adds each sharded gradient to its parameter's ``.grad``."""
        self.communicator.all_reduce_sum([], kind="control")
        for sharded, local in new:
            grad = as_sharded(local, sharded)
            sharded.grad = grad if sharded.grad is None else sharded.grad + grad

    def reduce_scatter(self, full: Tensor, sharded: Any) -> Tensor:
        comm = self.communicator
        share = (self.world_size - 1) / self.world_size
        chunk = -(-full.shape[0] // self.world_size)
        row_bytes = full[:1].numel() * full.element_size() if full.shape[0] else 0
        comm._count("reduce_scatter", chunk * self.world_size * row_bytes * share)
        return sharded_rows(full, sharded, self.model.group)

    def sharded_scalar_step(self, part: Part) -> StepRecord:
        """Scalar losses: each rank's gradient, averaged over the ranks (FSDP2's own convention)."""
        comm = self.communicator
        grads = part.grads if isinstance(part, GradsPart) else []
        new = []
        for index, (unsharded, sharded) in enumerate(self.model.pairs()):
            full = unsharded.new_zeros(unsharded.shape, dtype=sharded.dtype)
            with comm.guard("the gradient of the scalar loss"):
                grad = grads[index] if index < len(grads) else None
                if grad is not None:
                    full = grad.to(sharded.dtype)
            new.append((sharded, self.reduce_scatter(full, sharded) / self.world_size))
        (total,) = comm.all_reduce_sum([part.losses.reshape(())], kind="losses")
        self.write(new)
        return StepRecord(total / self.world_size)


class ShardedGramianPath(ShardedPath, DistributedGramianPath):
    """Instance-wise Gramian weightings on a ``fully_shard`` model."""

    local: GramianPath

    def __init__(self, local: GramianPath, model: ShardedModel) -> None:
        super().__init__(local, model.group)
        self.model = model
        model.keep_unsharded()
        self._engine: Engine | None = None
        self._engine_key: tuple[int, ...] = ()
        self._watch = ExitStack()

    def engine(self) -> Engine | None:
        """The engine over the unsharded parameters (``None`` before the first forward pass)."""
        unsharded = self.unsharded()
        key = tuple(id(p) for p in unsharded)
        if not key:
            return None
        if self._engine is None or key != self._engine_key:
            watching = self._engine is not None
            if self._engine is not None:
                self._watch.close()
                self._engine.close()
            self._engine = Engine(batch_dim=self.local.batch_dim, parameters=unsharded)
            self._engine_key = key
            if watching:
                self._watch.enter_context(self._engine.capture())
        return self._engine

    def before_forward(self) -> None:
        """Before the first forward pass: gathers every layer once, so that the engine (over the
        unsharded parameters) exists and watches every forward pass from this one on."""
        if self._engine is not None:
            return
        self.model.gather()
        engine = self.engine()
        assert engine is not None
        self._watch.enter_context(engine.capture())
        weakref.finalize(self, self._watch.close)

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        try:
            if losses.ndim == 0:
                return self.scalar_grads(losses, scale)
            engine = self.engine()
            if engine is None:
                raise ValueError(
                    "The losses do not come from a forward pass of the fully_shard model."
                )
            pairs = engine.compute_terms(losses * scale if scale != 1.0 else losses)
            return TermsPart(
                losses.detach(),
                [param for param, _ in pairs],
                [term for _, term in pairs],
                None,
                scale=scale,
            )
        finally:
            self.model.reshard()

    def scalar_step(self, part: Part) -> StepRecord:
        return self.sharded_scalar_step(part)

    def write_grads(self, part: TermsPart, local_weights: Tensor) -> None:
        comm = self.communicator
        sharded_of = {id(unsharded): sharded for unsharded, sharded in self.model.pairs()}
        moved = local_weights.detach().movedim(self.local.batch_dim, 0)
        rows = moved.reshape(moved.shape[0], -1)
        new = []
        for param, term in zip(part.params, part.terms, strict=True):
            sharded = sharded_of[id(param)]
            full = param.new_zeros(param.shape, dtype=sharded.dtype)
            with comm.guard("the local gradients"):
                full = term.weighted_grad(rows).to(sharded.dtype)
            new.append((sharded, self.reduce_scatter(full, sharded)))
            del full
        self.write(new)


@dataclass
class TaskRowsPart(Part):
    """The local ``[T, *shape]`` Jacobian of per-task losses, per unsharded parameter."""

    rows: list[Tensor | None]


class ShardedTaskPath(ShardedPath, DistributedPath):
    """Gramian weightings on per-task losses (no ``batch_dim``) on a ``fully_shard`` model."""

    local: JacobianPath

    def __init__(self, local: JacobianPath, model: ShardedModel) -> None:
        super().__init__(local, model.group)
        self.model = model
        model.keep_unsharded()

    @property
    def weighting(self) -> Weighting:
        module = self.module
        assert isinstance(module, Weighting)
        return module

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        try:
            if losses.ndim == 0:
                return self.scalar_grads(losses, scale)
            flat = (losses * scale if scale != 1.0 else losses).reshape(-1)
            unsharded = self.unsharded()
            per_task = []
            for task in range(flat.numel()):
                last = task == flat.numel() - 1
                per_task.append(
                    torch.autograd.grad(
                        flat[task], unsharded, retain_graph=not last, allow_unused=True
                    )
                )
            rows: list[Tensor | None] = []
            for index, param in enumerate(unsharded):
                grads = [grads[index] for grads in per_task]
                if all(g is None for g in grads):
                    rows.append(None)
                    continue
                rows.append(
                    torch.stack([torch.zeros_like(param) if g is None else g for g in grads])
                )
            return TaskRowsPart(losses.detach(), rows, scale=scale)
        finally:
            self.model.reshard()

    def combine(self, parts: Sequence[Part]) -> Part:
        if any(isinstance(p, FailedPart) for p in parts):
            return FailedPart(parts[-1].losses)
        check_same_kind(parts)
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], GradsPart):
            return self.local.combine_grads([p for p in parts if isinstance(p, GradsPart)])
        tasks = [p for p in parts if isinstance(p, TaskRowsPart)]
        rows: list[Tensor | None] = []
        for index in range(len(tasks[0].rows)):
            present = [p.rows[index] for p in tasks if p.rows[index] is not None]
            rows.append(torch.stack(present).sum(0) if present else None)  # type: ignore[arg-type]
        losses = torch.stack([p.losses for p in tasks]).sum(0)
        return TaskRowsPart(losses, rows, scale=tasks[0].scale)

    def apply_across(self, part: Part) -> StepRecord:
        comm = self.communicator
        losses = None if isinstance(part, FailedPart) else part.losses
        shapes = shapes_of(self.exchange_header(StepKind.TASKS, losses))
        if not shapes[0]:
            return self.sharded_scalar_step(part)
        same_shapes(
            shapes,
            "Without batch_dim the losses are per task, averaged over the ranks: every rank must "
            "return the same number of them (pass batch_dim= for per-instance losses)",
        )
        shape = shapes[0]
        tasks = int(torch.tensor(shape).prod())
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        local_rows = part.rows if isinstance(part, TaskRowsPart) else []
        shards: list[tuple[Any, Tensor]] = []
        gramian = torch.zeros(tasks, tasks, dtype=dtype)
        for index, (unsharded, sharded) in enumerate(self.model.pairs()):
            full = unsharded.new_zeros((tasks, *unsharded.shape), dtype=dtype)
            with comm.guard("the task Jacobian"):
                rows = local_rows[index] if index < len(local_rows) else None
                if rows is not None:
                    full = rows.reshape(tasks, *unsharded.shape).to(dtype)
            shard = self.reduce_scatter(full.movedim(0, 1), sharded) / self.world_size
            shard = shard.movedim(1, 0).reshape(tasks, -1)
            gramian = gramian.to(shard.device) + shard @ shard.T
            shards.append((sharded, shard))
        values = torch.zeros(shape, dtype=dtype) if losses is None else losses.to(dtype)
        total_gramian, total_losses = comm.all_reduce_sum([gramian, values], kind="gramian")
        mean_losses = (total_losses / self.world_size).to(part.losses.dtype)
        global_gramian = reshape_gramian(total_gramian, tuple(shape))
        weights = torch.zeros(shape, dtype=dtype, device=total_gramian.device)
        with comm.guard("the weighting"):
            check_gramian_finite(global_gramian, "The Gramian of the global losses")
            weights = weights_for(self.weighting, global_gramian).to(dtype)
        (weights,) = comm.all_reduce_sum([from_first_rank(weights, comm.rank)], kind="weights")
        flat_weights = weights.reshape(-1)
        new = []
        for sharded, shard in shards:
            local_shape = sharded.to_local().shape
            direction = (flat_weights @ shard).reshape(local_shape)
            new.append((sharded, direction))
        self.write(new)
        final = global_gramian
        return StepRecord(mean_losses, weights, _gramian=lambda: final)


def sharded_variant(local: Path, model: ShardedModel) -> DistributedPath:
    """The variant of ``local`` for a ``fully_shard`` model."""
    if isinstance(local, GramianPath):
        return ShardedGramianPath(local, model)
    if (
        isinstance(local, JacobianPath)
        and local.context.batch_dim is None
        and isinstance(local.module, Weighting)
    ):
        return ShardedTaskPath(local, model)
    raise ValueError(
        f"{local.module!r} is not supported on a fully_shard model: use a Gramian weighting "
        "(weighting=..., such as UPGradWeighting()) on per-instance losses (batch_dim=) or on "
        "per-task losses, or pass process_group=False for local steps on each rank."
    )
