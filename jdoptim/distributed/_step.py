"""The distributed step: each rank's part of a Jacobian-descent step that is exact on the global batch.

With ``R`` ranks and a ``batch_dim``, rank ``r``'s losses are its slice of the global losses,
concatenated along ``batch_dim`` in rank order. Without ``batch_dim`` (and in multi-task mode)
the losses are per task: the global loss of task ``t`` is the mean over ranks of the per-rank
losses (each the mean over an equally sized local batch, as DDP assumes). Every rank computes the same global Gramian (or Jacobian), rank 0's
weights are shared so that every rank applies bit-identical values, each rank builds the
gradient of its own losses under its slice of the weights, and one all-reduce sums them. DDP's
own gradient synchronisation is switched off during the closure (as under ``no_sync()``), so
gradients are reduced exactly once. Each path uses as few collectives as it can (the engine path:
a header, the factors' shapes, the factors, the weights, the gradients); failure flags ride along.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from jdoptim.autogram._rules import Term
from jdoptim.autojac import jac, jac_to_grad, mtl_backward
from jdoptim.autojac._jac_field import get_jac
from jdoptim.distributed._communicator import Communicator, at_offset, from_first_rank
from jdoptim.distributed._terms import global_gramian, term_factors, with_factors
from jdoptim.linalg import check_finite

if TYPE_CHECKING:
    from jdoptim.optim.jacobian_descent import JacobianDescent

Closure = Callable[[], Any]
_MAX_LOSS_DIMS = 8


class DistributedStep:
    """Fills ``.grad`` on this rank for a step that is exact on the batch of all ranks.

    ``bytes_sent`` holds, after each step, the bytes this rank sent per kind of collective.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.communicator = Communicator(group)
        self._stash: list[tuple[Tensor, Tensor | None]] | None = None

    @property
    def bytes_sent(self) -> dict[str, int]:
        return dict(self.communicator.bytes_sent)

    def fill_grad(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        """Calls the closure, fills ``.grad`` and returns the global losses (detached)."""
        self.communicator.start_step()
        self._stash = None
        try:
            if optimizer._shared_params is not None:
                return self._multi_task(optimizer, closure)
            path = optimizer._method.path
            if path == "scalarizer":
                return self._scalarizer(optimizer, closure)
            if optimizer.batch_dim is None:
                return self._tasks(optimizer, closure)
            if path == "jacobian":
                return self._jacobian(optimizer, closure)
            return self._gramian(optimizer, closure)
        except BaseException:
            if self._stash is not None:
                for param, old in self._stash:
                    param.grad = old
            raise

    # --- instance-wise paths ---------------------------------------------------------------------

    def _gramian(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        from jdoptim.optim.jacobian_descent import _needs_gramian, _weights

        comm = self.communicator
        weighting = optimizer._gramian_weighting
        engine = optimizer._get_engine() if _needs_gramian(weighting) else None
        losses: Tensor | None = None
        terms: list[Term] = []
        factors: list[Tensor] = []
        dims: list[int] = []
        with comm.guard("the closure or the local Gramian terms"):
            if engine is None:
                losses, _ = optimizer._call_closure(closure)
            else:
                with engine.capture():
                    losses, _ = optimizer._call_closure(closure)
                if losses.ndim > 0:
                    terms = [term for _, term in engine.compute_terms(losses)]
                    factors, dims = term_factors(terms)
        layouts: list[_Layout | None] = []

        def read_layout(headers: list[list[int]]) -> None:
            layouts.append(self._layout(headers, optimizer.batch_dim))

        if engine is None:
            read_layout(self._exchange_header("weights", losses))
            gathered: list[Term] = []
        else:
            gathered_factors = comm.all_gather_padded(
                factors, dims, header=_header("engine", losses), check=read_layout
            )
            gathered = with_factors(terms, gathered_factors)
        layout = layouts[0]
        assert losses is not None
        if layout is None:
            return self._scalar(optimizer, losses)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        weights = losses.new_zeros(layout.shape, dtype=dtype)
        with comm.guard("the weighting"):
            if engine is not None:
                gramian = global_gramian(gathered, layout.shape, layout.dim, dtype, losses.device)
                check_finite(gramian, "The Gramian of the global losses")
            else:
                gramian = losses.new_zeros((), dtype=dtype).expand(
                    *layout.shape, *layout.shape[::-1]
                )
            weights = _weights(weighting, gramian).to(dtype)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(losses.to(dtype))], kind="weights"
        )
        params = optimizer.params()
        self._take_grads(params)
        with comm.guard("the local gradients"):
            local = layout.local_slice(weights).to(losses.dtype)
            if engine is not None and optimizer.fuse_backward:
                engine.backward(local)
            else:
                torch.autograd.backward(losses, local)
        self._reduce_grads(params)
        return global_losses.to(losses.dtype)

    def _jacobian(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        comm = self.communicator
        params = optimizer.params()
        losses: Tensor | None = None
        tensors: list[Tensor] = []
        with comm.guard("the closure or the local Jacobian"):
            losses, _ = optimizer._call_closure(closure)
            if losses.ndim > 0:
                dim = _instance_dim(losses, optimizer.batch_dim)
                moved = losses.movedim(dim, 0)
                blocks = jac(
                    moved.reshape(-1), params, parallel_chunk_size=optimizer.parallel_chunk_size
                )
                rows = torch.cat([b.flatten(1) for b in blocks], dim=1)
                tensors = [rows, losses.detach()]
        layouts: list[_Layout | None] = []
        gathered = comm.all_gather_padded(
            tensors,
            [0, _instance_dim(losses, optimizer.batch_dim)] if tensors else [],
            header=_header("jacobian", losses),
            check=lambda headers: layouts.append(self._layout(headers, optimizer.batch_dim)),
        )
        layout = layouts[0]
        assert losses is not None
        if layout is None:
            return self._scalar(optimizer, losses)
        global_rows, global_losses = gathered
        direction = global_rows.new_zeros(global_rows.shape[1])
        with comm.guard("the aggregation"):
            natural = torch.empty_like(global_rows)
            natural[layout.natural_order(global_rows.device)] = global_rows
            direction = optimizer._jacobian_aggregator(natural)
        (direction,) = comm.all_reduce_sum(
            [from_first_rank(direction, comm.rank)], kind="direction"
        )
        self._set_direction(params, direction)
        return global_losses

    # --- task losses -------------------------------------------------------------------------------

    def _tasks(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        """Task losses (no ``batch_dim``): each the mean over ranks, so ``J̄ = mean_r J_r``.

        The ``[T, n]`` Jacobians are all-reduced (they are linear in the losses); every rank
        aggregates the same ``J̄`` and applies rank 0's direction.
        """
        from jdoptim.optim.jacobian_descent import _gramian_aggregator

        comm = self.communicator
        params = optimizer.params()
        losses: Tensor | None = None
        rows = torch.zeros(0)
        with comm.guard("the closure or the local Jacobian"):
            losses, _ = optimizer._call_closure(closure)
            if losses.ndim > 0:
                blocks = jac(
                    losses.reshape(-1), params, parallel_chunk_size=optimizer.parallel_chunk_size
                )
                rows = torch.cat([b.flatten(1) for b in blocks], dim=1)
        shapes = _shapes(self._exchange_header("tasks", losses))
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                "Without batch_dim the losses are per task, averaged over the ranks: every rank "
                f"must return the same number of them; got shapes {shapes}. Pass batch_dim= for "
                "per-instance losses."
            )
        assert losses is not None
        if losses.ndim == 0:
            return self._scalar(optimizer, losses)
        total_rows, total = comm.all_reduce_sum([rows, losses.detach()], kind="jacobian")
        scale = 1 / self.world_size
        direction = total_rows.new_zeros(total_rows.shape[1])
        with comm.guard("the aggregation"):
            aggregator = (
                optimizer._jacobian_aggregator
                if optimizer._method.path == "jacobian"
                else _gramian_aggregator(optimizer._gramian_weighting)
            )
            direction = aggregator(total_rows * scale)
        (direction,) = comm.all_reduce_sum(
            [from_first_rank(direction, comm.rank)], kind="direction"
        )
        self._set_direction(params, direction)
        return total * scale

    def _set_direction(self, params: Sequence[Tensor], direction: Tensor) -> None:
        """Splits ``direction`` into the params' ``.grad`` (added to what they held before)."""
        self._take_grads(params)
        offset = 0
        for param in params:
            part = direction[offset : offset + param.numel()].reshape(param.shape)
            param.grad = part.to(param.dtype)
            offset += param.numel()
        self._restore()

    def _scalarizer(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        comm = self.communicator
        losses: Tensor | None = None
        with comm.guard("the closure"):
            losses, _ = optimizer._call_closure(closure)
        headers = self._exchange_header("scalarizer", losses)
        assert losses is not None
        if _task_losses(optimizer) and losses.ndim > 0:
            return self._scalarized_tasks(optimizer, losses, _shapes(headers))
        layout = self._layout(headers, optimizer.batch_dim)
        if layout is None:
            return self._scalar(optimizer, losses)
        (values,) = comm.all_reduce_sum([layout.place(losses)], kind="losses")
        params = optimizer.params()
        self._take_grads(params)
        with comm.guard("the scalarized backward"):
            before = values.narrow(layout.dim, 0, layout.offset)
            end = layout.offset + layout.size
            after = values.narrow(layout.dim, end, values.shape[layout.dim] - end)
            global_losses = torch.cat([before, losses, after], dim=layout.dim)
            torch.autograd.backward(optimizer._method.module(global_losses))
        self._reduce_grads(params)
        return values

    def _scalarized_tasks(
        self, optimizer: JacobianDescent, losses: Tensor, shapes: list[tuple[int, ...]]
    ) -> Tensor:
        """Task losses (no ``batch_dim``): the scalarizer sees each task's mean over the ranks."""
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                f"Every rank must return the same number of task losses; got shapes {shapes}."
            )
        comm = self.communicator
        (total,) = comm.all_reduce_sum([losses.detach()], kind="losses")
        mean = total / self.world_size
        params = optimizer.params()
        self._take_grads(params)
        with comm.guard("the scalarized backward"):
            # Exactly the mean's value on every rank, with this rank's losses' gradient (1 / R).
            global_losses = mean + (losses - losses.detach()) / self.world_size
            torch.autograd.backward(optimizer._method.module(global_losses))
        self._reduce_grads(params)
        return mean

    def _scalar(self, optimizer: JacobianDescent, losses: Tensor) -> Tensor:
        """A scalar loss per rank: its gradient averaged over the ranks, as DDP does."""
        params = optimizer.params()
        self._take_grads(params)
        with self.communicator.guard("the backward of the scalar loss"):
            torch.autograd.backward(losses)
        (total,) = self._reduce_grads(params, [losses.detach()], scale=1 / self.world_size)
        return total

    # --- multi-task mode -------------------------------------------------------------------------

    def _multi_task(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        from jdoptim.optim.jacobian_descent import _gramian_aggregator

        comm = self.communicator
        params = optimizer.params()
        shared = [p for p in optimizer._shared_params or [] if p.requires_grad]
        shared_ids = {id(p) for p in shared}
        heads = [p for p in params if id(p) not in shared_ids]
        losses: Tensor | None = None
        with comm.guard("the closure or the local multi-task backward"):
            losses, features = optimizer._call_closure(closure, expect_features=True)
            if any(get_jac(p) is not None for p in shared):
                raise ValueError(
                    "Shared parameters already hold a .jac before the step; call zero_grad() in "
                    "the closure."
                )
            self._take_grads(params)
            mtl_backward(
                losses,
                features,
                tasks_params=optimizer._tasks_params,
                shared_params=shared,
                parallel_chunk_size=optimizer.parallel_chunk_size,
            )
        shapes = _shapes(self._exchange_header("multi_task", losses))
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                f"In multi-task mode every rank must return the same number of task losses; got "
                f"shapes {shapes}."
            )
        assert losses is not None
        tasks = losses.numel()
        jacobians = [_or_zeros(get_jac(p), (tasks, *p.shape), p) for p in shared]
        grads = [_or_zeros(p.grad, tuple(p.shape), p) for p in heads]
        *reduced, global_losses = comm.all_reduce_sum(
            [*jacobians, *grads, losses.detach()], kind="jacobian"
        )
        scale = 1 / self.world_size
        aggregated = [p.new_zeros(p.shape) for p in shared]
        with comm.guard("the aggregation"):
            for param, jacobian in zip(shared, reduced[: len(shared)], strict=True):
                setattr(param, "jac", jacobian * scale)  # noqa: B010
                param.grad = None
            aggregator = (
                optimizer._jacobian_aggregator
                if optimizer._method.path == "jacobian"
                else _gramian_aggregator(optimizer._gramian_weighting)
            )
            jac_to_grad(shared, aggregator)
            aggregated = [_or_zeros(p.grad, tuple(p.shape), p) for p in shared]
        synced = comm.all_reduce_sum(
            [from_first_rank(g, comm.rank) for g in aggregated], kind="direction"
        )
        for param, grad in zip(shared, synced, strict=True):
            param.grad = grad
        for param, grad in zip(heads, reduced[len(shared) :], strict=True):
            param.grad = grad * scale
        self._restore()
        return global_losses * scale

    # --- shared pieces ---------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.communicator.world_size

    def global_losses(self, losses: Tensor, optimizer: JacobianDescent) -> Tensor:
        """The global losses for this rank's ``losses`` (as :meth:`fill_grad` returns them)."""
        comm = self.communicator
        layout = None
        if not _task_losses(optimizer):
            layout = self._layout(self._exchange_header("evaluate", losses), optimizer.batch_dim)
        if layout is None:
            (total,) = comm.all_reduce_sum([losses.detach()], kind="losses")
            return total / self.world_size
        (values,) = comm.all_reduce_sum([layout.place(losses)], kind="losses")
        return values

    def _layout(self, headers: list[list[int]], batch_dim: int | None) -> _Layout | None:
        """Where this rank's losses sit in the global ones; ``None`` for scalar losses.

        Decided from every rank's losses shape, so every rank decides (or raises) alike.
        """
        shapes = _shapes(headers)
        if len({len(shape) for shape in shapes}) != 1:
            raise ValueError(
                f"The ranks returned losses with different numbers of dims: {shapes}; every rank "
                "must return losses of the same kind."
            )
        if not shapes[0]:
            return None
        dim = (0 if batch_dim is None else batch_dim) % len(shapes[0])
        rest = {tuple(s for d, s in enumerate(shape) if d != dim) for shape in shapes}
        if len(rest) != 1:
            raise ValueError(
                f"The ranks' losses differ outside the instance dim {dim}: shapes {shapes}. Only "
                "the number of instances may differ between ranks."
            )
        sizes = [shape[dim] for shape in shapes]
        rank = self.communicator.rank
        global_shape = list(shapes[0])
        global_shape[dim] = sum(sizes)
        return _Layout(tuple(global_shape), dim, sum(sizes[:rank]), sizes[rank])

    def _exchange_header(self, kind: str, losses: Tensor | None) -> list[list[int]]:
        """Every rank's step header, in an exchange as long as ``all_gather_padded``'s first one.

        Every step starts with one such exchange, of the same length on every path, so that ranks
        on different paths (differently configured optimizers) get a clear error, not a hang.
        """
        headers = self.communicator.exchange_ints([0, 0, *_header(kind, losses)])
        return [header[2:] for header in headers]

    def _take_grads(self, params: Sequence[Tensor]) -> None:
        """Sets each ``.grad`` aside, so that the step reduces only its own part."""
        self._stash = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None

    def _restore(self) -> None:
        """Adds the gradients set aside back (they were there before the step)."""
        if self._stash is not None:
            for param, old in self._stash:
                if old is not None:
                    param.grad = old if param.grad is None else param.grad + old
        self._stash = None

    def _reduce_grads(
        self, params: Sequence[Tensor], extra: Sequence[Tensor] = (), scale: float = 1.0
    ) -> list[Tensor]:
        """Sums every rank's gradients (and ``extra``) in one all-reduce; returns ``extra``'s sums."""
        grads = [_or_zeros(p.grad, tuple(p.shape), p) for p in params]
        reduced = self.communicator.all_reduce_sum([*grads, *extra], kind="gradients")
        for param, grad in zip(params, reduced[: len(params)], strict=True):
            param.grad = grad if scale == 1.0 else grad * scale
        self._restore()
        return [total * scale for total in reduced[len(params) :]]


class _Layout:
    """Where this rank's losses sit in the global losses."""

    def __init__(self, shape: tuple[int, ...], dim: int, offset: int, size: int) -> None:
        self.shape = shape
        self.dim = dim
        self.offset = offset
        self.size = size

    def local_slice(self, weights: Tensor) -> Tensor:
        return weights.narrow(self.dim, self.offset, self.size)

    def place(self, losses: Tensor) -> Tensor:
        """This rank's losses in zeros of the global shape (summed over ranks: the global losses)."""
        return at_offset(losses, self.shape, self.dim, self.offset)

    def natural_order(self, device: torch.device) -> Tensor:
        """Flat index in the global losses of each instance-major row."""
        rows = torch.arange(math.prod(self.shape), device=device)
        return rows.reshape(self.shape).movedim(self.dim, 0).reshape(-1)


def _task_losses(optimizer: JacobianDescent) -> bool:
    """Whether the losses are per task (averaged over ranks) rather than per instance."""
    return optimizer._shared_params is not None or optimizer.batch_dim is None


def _instance_dim(losses: Tensor | None, batch_dim: int | None) -> int:
    if losses is None or losses.ndim == 0:
        return 0
    return (0 if batch_dim is None else batch_dim) % losses.ndim


def _shape_header(losses: Tensor | None) -> list[int]:
    """``[ndim, *shape]`` padded to a fixed length (zeros for a rank without losses)."""
    if losses is None:
        return [0] * (_MAX_LOSS_DIMS + 1)
    if losses.ndim > _MAX_LOSS_DIMS:
        raise ValueError(f"Distributed steps support losses of up to {_MAX_LOSS_DIMS} dims.")
    return [losses.ndim, *losses.shape, *([0] * (_MAX_LOSS_DIMS - losses.ndim))]


def _shape_of(header: list[int]) -> tuple[int, ...]:
    return tuple(header[1 : 1 + header[0]])


_KINDS = {
    "engine": 1,
    "weights": 2,
    "jacobian": 3,
    "scalarizer": 4,
    "multi_task": 5,
    "evaluate": 6,
    "tasks": 7,
}


def _header(kind: str, losses: Tensor | None) -> list[int]:
    """``[kind of step, ndim, *shape, 0...]``: what every rank announces first."""
    return [_KINDS[kind], *_shape_header(losses)]


def _shapes(headers: list[list[int]]) -> list[tuple[int, ...]]:
    """The losses' shapes from every rank's header; the ranks must run the same kind of step."""
    kinds = {header[0] for header in headers}
    if len(kinds) != 1:
        names = {code: name for name, code in _KINDS.items()}
        raise ValueError(
            f"The ranks run different kinds of steps ({sorted(names.get(k, '?') for k in kinds)}): "
            "every rank must build its optimizer with the same method and options."
        )
    return [_shape_of(header[1:]) for header in headers]


def _or_zeros(tensor: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_zeros(shape)
