"""The distributed paths for ``fully_shard`` models: exact global steps, sharded ``.grad``.

Instance-wise losses (:class:`ShardedGramianPath`): the engine covers the unsharded parameters;
every rank gathers the per-layer term factors as on the DDP path, builds the global Gramian and
rank 0's weights, then, one parameter at a time, weighs its own terms into a full-size gradient
and reduce-scatters it (a sum, not FSDP2's mean): each rank keeps only its shard in ``.grad``.

Per-task losses, and coordinate-wise aggregators (:class:`ShardedRowsPath`): each rank
differentiates each of its losses, and a reduce-scatter per layer leaves each rank its columns
``J_s`` of the global Jacobian. For per-task losses, ``G = Σ_s J_s J_sᵀ`` is one ``T × T``
all-reduce and each rank's shard of the direction is ``wᵀ J_s``; a coordinate-wise aggregator
runs on ``J_s`` itself.

Scalarizers (:class:`ShardedScalarizerPath`): the gradient of the scalarized global losses.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import Aggregator, Weighting
from jdoptim.autogram import Engine
from jdoptim.distributed._communicator import from_first_rank
from jdoptim.distributed._fsdp import ShardedModel, as_sharded, sharded_rows
from jdoptim.distributed._gramian import DistributedGramianPath
from jdoptim.distributed._layout import Layout, StepKind, layout_of, same_shapes, shapes_of
from jdoptim.distributed._path_base import DistributedPath, FailedPart
from jdoptim.distributed._scalarizer import DistributedScalarizerPath
from jdoptim.linalg import reshape_gramian
from jdoptim.paths import (
    GradsPart,
    GramianPath,
    JacobianPath,
    LossesPart,
    Part,
    Path,
    ScalarizerPath,
    StepRecord,
    TermsPart,
    check_gramian_finite,
    weights_for,
)


class ShardedPath:
    """What both sharded paths share: the model, the unsharded parameters, scalar losses."""

    model: ShardedModel
    communicator: Any
    context: Any
    world_size: int

    def shared_base(self, grads: list[Any], params: list[Any]) -> list[Any]:
        """As it is: a sharded parameter's ``.grad`` is its shard, which ``fully_shard``'s own
        backward reduced (jdoptim leaves that synchronisation on)."""
        return grads

    def before_forward(self) -> None:
        """Called when a forward pass of the model starts: the first one learns the parameters."""
        if not self.model.params():
            self.model.gather()

    def apply(self, part: Part) -> StepRecord:
        self.model.reshard()
        return super().apply(part)  # type: ignore[misc, no-any-return]

    def run(
        self,
        losses: Tensor | None,
        features: Any,
        scale: float,
        next_losses: Callable[[], Tensor],
    ) -> StepRecord:
        if losses is None:  # the closure failed here after its forward: the others' passes go on
            self.finish_passes()
        return super().run(losses, features, scale, next_losses)  # type: ignore[misc, no-any-return]

    def overflowed(self, losses: Tensor) -> None:
        """Rounds until the other ranks' passes are over, then the step's first exchange, after
        which every rank skips the step."""
        self.finish_passes()
        super().overflowed(losses)  # type: ignore[misc]

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        """This rank's passes (guarded), then rounds until every rank's passes are over."""
        try:
            self.model.begin_passes()
            return super().differentiate(losses, features, scale)  # type: ignore[misc, no-any-return]
        finally:
            self.finish_passes()

    def finish_passes(self) -> None:
        """Rounds until every rank's passes are over; counts their bytes (FSDP2's all-gathers in
        them as ``layer_gathers``, the rounds' own all-reduces as ``rounds``)."""
        model, comm, world = self.model, self.communicator, self.world_size
        try:
            model.finish_passes()
        finally:
            comm.count(
                "rounds", model.rounds * (len(model.modules) + 1) * 8 * 2 * (world - 1) / world
            )
            comm.count("layer_gathers", model.gathered_bytes * (world - 1) / world)
            model.rounds = model.gathers = model.gathered_bytes = 0

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

    def grad_items(
        self, grads: Sequence[Tensor | None]
    ) -> list[tuple[Tensor, Any, Callable[[], Tensor | None]]]:
        """:meth:`scatter_by_layer`'s items for full gradients listed in :meth:`ShardedModel.pairs`
        order (``grads[i]`` is pair ``i``'s, in any dtype; missing or ``None``: none)."""

        def full(index: int, dtype: torch.dtype) -> Callable[[], Tensor | None]:
            def make() -> Tensor | None:
                grad = grads[index] if index < len(grads) else None
                return None if grad is None else grad.to(dtype)

            return make

        return [(u, s, full(i, s.dtype)) for i, (u, s) in enumerate(self.model.pairs())]

    def scatter_by_layer(
        self,
        items: list[tuple[Tensor, Any, Callable[[], Tensor | None]]],
        shape_of: Any,
        stage: str,
    ) -> list[tuple[Any, Tensor]]:
        """``(sharded, rows)`` for each ``(unsharded, sharded, full)`` item: this rank's rows of
        the sum over ranks of ``full()``, one reduce-scatter per ``fully_shard`` layer.

        ``full()`` runs guarded, one layer at a time (so one layer's full tensors exist at once);
        where it fails or gives ``None``, zeros of ``shape_of(unsharded)`` travel instead.
        """
        comm = self.communicator
        layer_of = {id(u): layer for u, _, layer in self.model.params()}
        layers: dict[int, list[int]] = {}
        for index, (unsharded, _, _) in enumerate(items):
            layers.setdefault(layer_of[id(unsharded)], []).append(index)
        results: dict[int, tuple[Any, Tensor]] = {}
        share = (self.world_size - 1) / self.world_size
        for layer in sorted(layers):
            members = layers[layer]
            fulls = []
            for index in members:
                unsharded, sharded, make = items[index]
                full = None
                with comm.guard(stage):
                    full = make()
                if full is None:
                    full = unsharded.new_zeros(shape_of(unsharded), dtype=sharded.dtype)
                fulls.append(full)
            shardeds = [items[index][1] for index in members]
            padded = sum(
                -(-f.shape[0] // self.world_size) * self.world_size * f[:1].numel() for f in fulls
            )
            comm.count("reduce_scatter", padded * fulls[0].element_size() * share)
            rows = sharded_rows(fulls, shardeds, self.model.group)
            for index, sharded, local in zip(members, shardeds, rows, strict=True):
                results[index] = (sharded, local)
            del fulls
        return [results[index] for index in range(len(items))]

    def sharded_scalar_step(self, part: Part) -> StepRecord:
        """Scalar losses: each rank's gradient, averaged over the ranks (FSDP2's own convention)."""
        comm = self.communicator
        grads = part.grads if isinstance(part, GradsPart) else []
        items = self.grad_items(grads)
        scattered = self.scatter_by_layer(items, _shape, "the gradient of the scalar loss")
        new = [(sharded, local / self.world_size) for sharded, local in scattered]
        (total,) = comm.all_reduce_sum([part.losses.reshape(())], kind="losses")
        self.write(new)
        return StepRecord(total / self.world_size)


class ShardedGramianPath(ShardedPath, DistributedGramianPath):
    """Instance-wise Gramian weightings on a ``fully_shard`` model."""

    local: GramianPath

    def __init__(self, local: GramianPath, model: ShardedModel) -> None:
        super().__init__(local, model.group)
        self.model = model
        self._engine: Engine | None = None
        # Closes the engine (its hooks leave the model) when replaced or when this is collected.
        self._close_engine: weakref.finalize[[], Any] | None = None
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
            if self._close_engine is not None:
                self._watch.close()
                self._close_engine()
            self._engine = Engine(batch_dim=self.local.batch_dim, parameters=unsharded)
            self._close_engine = weakref.finalize(self, self._engine.close)
            self._engine_key = key
            if watching:
                self._watch.enter_context(self._engine.capture())
        return self._engine

    def before_forward(self) -> None:
        """Before the first forward pass: gathers every layer once, so that the engine (over the
        unsharded parameters) exists and watches every forward pass from this one on."""
        if self._engine is not None:
            return
        super().before_forward()
        engine = self.engine()
        assert engine is not None
        self._watch.enter_context(engine.capture())
        weakref.finalize(self, self._watch.close)

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        if losses.ndim == 0:
            return self.scalar_grads(losses, scale)
        engine = self.engine()
        if engine is None:
            raise ValueError("The losses do not come from a forward pass of the fully_shard model.")
        pairs = engine.compute_terms(losses * scale if scale != 1.0 else losses)
        return TermsPart(
            losses.detach(),
            [param for param, _ in pairs],
            [term for _, term in pairs],
            None,
            scale=scale,
        )

    def scalar_step(self, part: Part) -> StepRecord:
        return self.sharded_scalar_step(part)

    def parameter_order(self) -> list[Tensor]:
        return self.unsharded()

    def write_grads(self, part: TermsPart, local_weights: Tensor) -> None:
        sharded_of = {id(unsharded): sharded for unsharded, sharded in self.model.pairs()}
        moved = local_weights.detach().movedim(self.local.batch_dim, 0)
        rows = moved.reshape(moved.shape[0], -1)

        def weighted(term: Any, dtype: torch.dtype) -> Callable[[], Tensor | None]:
            return lambda: term.weighted_grad(rows).to(dtype)

        items = [
            (param, sharded_of[id(param)], weighted(term, sharded_of[id(param)].dtype))
            for param, term in zip(part.params, part.terms, strict=True)
        ]
        self.write(self.scatter_by_layer(items, _shape, "the local gradients"))


@dataclass
class TaskRowsPart(Part):
    """The local ``[m, *shape]`` Jacobian of the losses (flat order), per unsharded parameter."""

    rows: list[Tensor | None]


class ShardedRowsPath(ShardedPath, DistributedPath):
    """The Jacobian of the global losses, each rank holding its columns (its parameter shards).

    For Gramian weightings on per-task losses (no ``batch_dim``), and for coordinate-wise
    aggregators (``TrimmedMean``) on any losses. Each rank differentiates each of its losses (one
    backward pass per loss); a reduce-scatter per layer leaves each rank its columns ``J_s`` of
    the global Jacobian (per-task losses: the mean over the ranks; per-instance losses: each
    rank's rows at their place). A weighting sees ``G = Σ_s J_s J_sᵀ`` (one all-reduce) and each
    rank's shard of the direction is ``wᵀ J_s``; a coordinate-wise aggregator runs on ``J_s``.
    """

    local: JacobianPath

    def __init__(self, local: JacobianPath, model: ShardedModel) -> None:
        super().__init__(local, model.group)
        self.model = model

    @property
    def weighting(self) -> Weighting:
        module = self.module
        assert isinstance(module, Weighting)
        return module

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        if losses.ndim == 0:
            return self.scalar_grads(losses, scale)
        flat = (losses * scale if scale != 1.0 else losses).reshape(-1)
        unsharded = self.unsharded()
        per_task = []
        for task in range(flat.numel()):
            last = task == flat.numel() - 1
            per_task.append(
                torch.autograd.grad(flat[task], unsharded, retain_graph=not last, allow_unused=True)
            )
        rows: list[Tensor | None] = []
        for index, param in enumerate(unsharded):
            grads = [grads[index] for grads in per_task]
            if all(g is None for g in grads):
                rows.append(None)
                continue
            rows.append(torch.stack([torch.zeros_like(param) if g is None else g for g in grads]))
        return TaskRowsPart(losses.detach(), rows, scale=scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        if any(isinstance(p, FailedPart) for p in parts):
            return FailedPart(parts[-1].losses)
        if len({type(p) for p in parts}) > 1:
            raise ValueError(
                "The micro-batches of one step gave losses of different kinds (a scalar for some, "
                "a vector for others); give every backward() losses of the same kind."
            )
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], GradsPart):
            return self.local.combine_grads([p for p in parts if isinstance(p, GradsPart)])
        if self.context.batch_dim is not None:
            raise ValueError(
                f"Gradient accumulation with {self.module!r} on a fully_shard model is not "
                "supported; take one backward() per step."
            )
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
        batch_dim = self.context.batch_dim
        kind = StepKind.TASKS if batch_dim is None else StepKind.JACOBIAN
        shapes = shapes_of(self.exchange_header(kind, losses))
        if not shapes[0]:
            return self.sharded_scalar_step(part)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        values = torch.zeros(shapes[comm.rank], dtype=dtype, device=comm.device)
        if losses is not None:
            values = losses.to(dtype)
        if batch_dim is None:
            same_shapes(
                shapes,
                "Without batch_dim the losses are per task, averaged over the ranks: every rank "
                "must return the same number of them (pass batch_dim= for per-instance losses)",
            )
            shape, divisor, where = shapes[0], self.world_size, None
        else:
            layout = layout_of(shapes, batch_dim, comm.rank)
            assert layout is not None
            shape, divisor = layout.shape, 1
            values = layout.place(values)
            where = _global_rows(layout, shapes[comm.rank])
        rows = math.prod(shape)
        local_rows = part.rows if isinstance(part, TaskRowsPart) else []

        def full_rows(index: int, unsharded: Tensor) -> Callable[[], Tensor | None]:
            def make() -> Tensor | None:
                local = local_rows[index] if index < len(local_rows) else None
                if local is None:
                    return None
                local = local.reshape(-1, *unsharded.shape).to(dtype)
                if where is not None:  # this rank's rows at their place in the global Jacobian
                    placed = local.new_zeros(rows, *unsharded.shape)
                    placed[where] = local
                    local = placed
                return local.movedim(0, 1)

            return make

        items = [(u, s, full_rows(i, u)) for i, (u, s) in enumerate(self.model.pairs())]
        scattered = self.scatter_by_layer(
            items, lambda u: (u.shape[0], rows, *u.shape[1:]), "the Jacobian"
        )
        shards = [
            (sharded, (local / divisor).movedim(1, 0).reshape(rows, -1))
            for sharded, local in scattered
        ]
        if isinstance(self.module, Weighting):
            return self._weighted(shards, values, shape, divisor, part.losses.dtype)
        (total,) = comm.all_reduce_sum([values], kind="losses")
        global_losses = (total / divisor).to(part.losses.dtype)
        directions = [shard.new_zeros(shard.shape[1]) for _, shard in shards]
        with comm.guard("the aggregation"):
            # Coordinate-wise: this rank's columns of J give its coordinates of the direction.
            direction = self.module(torch.cat([shard for _, shard in shards], dim=1))
            directions = list(direction.split([shard.shape[1] for _, shard in shards]))
        self.write(
            [
                (sharded, piece.reshape(sharded.to_local().shape))
                for (sharded, _), piece in zip(shards, directions, strict=True)
            ]
        )
        return StepRecord(global_losses)

    def _weighted(
        self,
        shards: list[tuple[Any, Tensor]],
        values: Tensor,
        shape: tuple[int, ...],
        divisor: int,
        losses_dtype: torch.dtype,
    ) -> StepRecord:
        """A Gramian weighting: ``G = Σ_s J_s J_sᵀ`` (one all-reduce), rank 0's weights."""
        comm = self.communicator
        rows = math.prod(shape)
        gramian = torch.zeros(rows, rows, dtype=values.dtype, device=comm.device)
        for _, shard in shards:
            gramian = gramian.to(shard.device) + shard @ shard.T
        total_gramian, total_losses = comm.all_reduce_sum([gramian, values], kind="gramian")
        mean_losses = (total_losses / divisor).to(losses_dtype)
        global_gramian = reshape_gramian(total_gramian, tuple(shape))
        weights = torch.zeros(shape, dtype=values.dtype, device=total_gramian.device)
        with comm.guard("the weighting"):
            check_gramian_finite(global_gramian, "The Gramian of the global losses")
            weights = weights_for(self.weighting, global_gramian).to(values.dtype)
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


def _global_rows(layout: Layout, shape: tuple[int, ...]) -> Tensor:
    """Where each of this rank's losses (flat order) sits in the global losses (flat order)."""
    numbers = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
    placed = layout.place(numbers).reshape(-1)
    where = placed.nonzero().squeeze(1)
    return where[placed[where].long().argsort()]


class ShardedScalarizerPath(ShardedPath, DistributedScalarizerPath):
    """Scalarizers on a ``fully_shard`` model: the gradient of the scalarized global losses.

    As on the DDP path, each rank differentiates the scalarizer of the global losses, in which
    only its own losses carry a graph; the per-layer reduce-scatter (a sum) leaves each rank its
    rows of the total. A learnable scalarizer's parameters (``UW``'s) get their whole gradient on
    every rank, from the global losses: rank 0's is shared. Other parameters outside the model are
    summed over the ranks.
    """

    local: ScalarizerPath

    def __init__(self, local: ScalarizerPath, model: ShardedModel) -> None:
        super().__init__(local, model.group)
        self.model = model

    def local_part(self, losses: Tensor, features: Any, scale: float) -> Part:
        if losses.ndim == 0:
            return self.scalar_grads(losses, scale)
        return LossesPart(losses.detach(), losses, scale=scale)

    def scalar_step(self, part: Part) -> StepRecord:
        return self.sharded_scalar_step(part)

    def scalarized_backward(self, global_losses: Callable[[], Tensor], scale: float) -> None:
        comm = self.communicator
        unsharded = self.unsharded()
        sharded = {id(s) for _, s in self.model.pairs()}
        replicated = [p for p in self.context.params() if id(p) not in sharded]
        grads: list[Tensor | None] = []
        self.model.begin_passes()
        try:
            with comm.guard("the scalarized backward"):
                scalar = self.module(global_losses()) * scale
                grads = list(
                    torch.autograd.grad(scalar, [*unsharded, *replicated], allow_unused=True)
                )
        finally:
            self.finish_passes()

        scattered = self.scatter_by_layer(self.grad_items(grads), _shape, "the scalarized gradient")
        extra = [
            grads[len(unsharded) + i] if len(grads) > len(unsharded) + i else None
            for i in range(len(replicated))
        ]
        # The scalarizer's own parameters get their whole gradient on every rank (it sees the
        # global losses): rank 0's is kept, not the sum.
        own = {id(p) for p in self.module.parameters()}
        contributions = [
            p.new_zeros(p.shape)
            if g is None
            else from_first_rank(g, comm.rank)
            if id(p) in own
            else g
            for p, g in zip(replicated, extra, strict=True)
        ]
        summed = comm.all_reduce_sum(contributions, kind="gradients")
        self.write(scattered)
        for param, grad in zip(replicated, summed[: len(replicated)], strict=True):
            param.grad = grad if param.grad is None else param.grad + grad


def _shape(unsharded: Tensor) -> tuple[int, ...]:
    return tuple(unsharded.shape)


def sharded_variant(local: Path, model: ShardedModel) -> DistributedPath:
    """The variant of ``local`` for a ``fully_shard`` model."""
    if isinstance(local, GramianPath):
        return ShardedGramianPath(local, model)
    module = local.module
    if isinstance(local, JacobianPath) and (
        (
            local.context.batch_dim is None
            and isinstance(module, Weighting)
            and module.input_kind == "gramian"
        )
        or (isinstance(module, Aggregator) and module.coordinate_wise)
    ):
        return ShardedRowsPath(local, model)
    if isinstance(local, ScalarizerPath):
        return ShardedScalarizerPath(local, model)
    raise ValueError(
        f"{local.module!r} is not supported on a fully_shard model: it needs whole rows of the "
        "Jacobian, which no rank holds (each holds its parameters' shards). Use a Gramian "
        "weighting (weighting=..., such as UPGradWeighting(), or an aggregator built on one, "
        "such as UPGrad()), a coordinate-wise aggregator (TrimmedMean) or a scalarizer, or pass "
        "process_group=False for local steps on each rank."
    )
