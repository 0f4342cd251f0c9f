"""The distributed step: each rank's part of a Jacobian-descent step that is exact on the global batch.

With ``R`` ranks, rank ``r``'s losses are its slice of the global losses, concatenated along the
instance dim (``batch_dim``, or dim 0) in rank order; in multi-task mode, the global loss of task
``t`` is the mean over ranks of the per-rank losses (each the mean over an equally sized local
batch, as DDP assumes). Every rank computes the same global Gramian (or Jacobian), rank 0's
weights are broadcast so that every rank applies bit-identical values, each rank builds the
gradient of its own losses under its slice of the weights, and one all-reduce sums them. DDP's
own gradient synchronisation is switched off during the closure (as under ``no_sync()``), so
gradients are reduced exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from jdoptim.autogram._rules import Term
from jdoptim.autojac import jac, mtl_backward
from jdoptim.autojac._jac_field import get_jac
from jdoptim.distributed._communicator import Communicator
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

    @property
    def bytes_sent(self) -> dict[str, int]:
        return dict(self.communicator.bytes_sent)

    def fill_grad(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        self.communicator.reset_counts()
        path = optimizer._method.path
        if optimizer._shared_params is not None:
            return self._multi_task(optimizer, closure)
        if path == "scalarizer":
            return self._scalarizer(optimizer, closure)
        if path == "jacobian":
            return self._jacobian(optimizer, closure)
        return self._gramian(optimizer, closure)

    # --- instance-wise paths ---------------------------------------------------------------------

    def _gramian(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        from jdoptim.optim.jacobian_descent import _needs_gramian, _weights

        comm = self.communicator
        weighting = optimizer._gramian_weighting
        needs_gramian = _needs_gramian(weighting)
        engine = optimizer._get_engine() if needs_gramian else None
        with comm.phase("the closure"):
            if engine is not None:
                with engine.capture():
                    losses, _ = optimizer._call_closure(closure)
            else:
                losses, _ = optimizer._call_closure(closure)
        layout = self._layout(losses, optimizer.batch_dim)
        if layout is None:
            return self._scalar(optimizer, losses)
        with comm.phase("the local Gramian terms"):
            stash = _take_grads(optimizer.params())
            terms: list[Term] = []
            if engine is not None:
                engine.compute_gramian(losses)
                pending = engine._pending
                assert pending is not None
                terms = [term for _, term in pending.terms]
            factors, dims = term_factors(terms)
        gathered = (
            with_factors(terms, comm.all_gather_padded(factors, dims)) if engine is not None else []
        )
        with comm.phase("the weighting"):
            dtype = torch.promote_types(losses.dtype, torch.float32)
            if engine is not None:
                gramian = global_gramian(gathered, layout.shape, layout.dim, dtype, losses.device)
                check_finite(gramian, "The Gramian of the global losses")
            else:
                gramian = losses.new_zeros(()).expand(*layout.shape, *layout.shape[::-1])
            weights = _weights(weighting, gramian)
        weights = comm.broadcast_from_first(weights)
        with comm.phase("the local gradients"):
            local = layout.local_slice(weights).to(losses.dtype)
            if engine is not None and optimizer.fuse_backward:
                engine.backward(local)
            else:
                torch.autograd.backward(losses, local)
        self._reduce_grads(optimizer.params(), stash, scale=1.0)
        return self._global_losses(losses, layout)

    def _jacobian(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        comm = self.communicator
        params = optimizer.params()
        with comm.phase("the closure"):
            losses, _ = optimizer._call_closure(closure)
        layout = self._layout(losses, optimizer.batch_dim)
        if layout is None:
            return self._scalar(optimizer, losses)
        with comm.phase("the local Jacobian"):
            stash = _take_grads(params)
            moved = losses.movedim(layout.dim, 0)
            blocks = jac(
                moved.reshape(-1), params, parallel_chunk_size=optimizer.parallel_chunk_size
            )
            rows = torch.cat([b.flatten(1) for b in blocks], dim=1)
        (global_rows,) = comm.all_gather_padded([rows], [0])
        with comm.phase("the aggregation"):
            natural = torch.empty_like(global_rows)
            natural[layout.natural_order(global_rows.device)] = global_rows
            direction = optimizer._jacobian_aggregator(natural)
        direction = comm.broadcast_from_first(direction)
        offset = 0
        for param, old in zip(params, stash, strict=True):
            part = direction[offset : offset + param.numel()].reshape(param.shape).to(param.dtype)
            offset += param.numel()
            param.grad = part if old is None else old + part
        return self._global_losses(losses, layout)

    def _scalarizer(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        comm = self.communicator
        with comm.phase("the closure"):
            losses, _ = optimizer._call_closure(closure)
        layout = self._layout(losses, optimizer.batch_dim)
        if layout is None:
            return self._scalar(optimizer, losses)
        (values,) = comm.all_gather_padded([losses.detach()], [layout.dim])
        with comm.phase("the scalarized backward"):
            stash = _take_grads(optimizer.params())
            start = layout.offset
            size = losses.shape[layout.dim]
            before = values.narrow(layout.dim, 0, start)
            after = values.narrow(layout.dim, start + size, values.shape[layout.dim] - start - size)
            global_losses = torch.cat([before, losses, after], dim=layout.dim)
            torch.autograd.backward(optimizer._method.module(global_losses))
        self._reduce_grads(optimizer.params(), stash, scale=1.0)
        return global_losses.detach()

    def _scalar(self, optimizer: JacobianDescent, losses: Tensor) -> Tensor:
        """A scalar loss per rank: its gradient averaged over the ranks, as DDP does."""
        with self.communicator.phase("the backward of the scalar loss"):
            stash = _take_grads(optimizer.params())
            torch.autograd.backward(losses)
        self._reduce_grads(optimizer.params(), stash, scale=1.0 / self.communicator.world_size)
        return self._global_losses(losses, None)

    # --- multi-task mode -------------------------------------------------------------------------

    def _multi_task(self, optimizer: JacobianDescent, closure: Closure) -> Tensor:
        from jdoptim.optim.jacobian_descent import _gramian_aggregator

        comm = self.communicator
        params = optimizer.params()
        shared = [p for p in optimizer._shared_params or [] if p.requires_grad]
        shared_ids = {id(p) for p in shared}
        others = [p for p in params if id(p) not in shared_ids]
        with comm.phase("the closure"):
            losses, features = optimizer._call_closure(closure, expect_features=True)
        shapes = comm.all_gather_ints(_shape_header(losses))
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError(
                "In multi-task mode every rank must return the same number of task losses; got "
                f"shapes {[_shape_of(s) for s in shapes]}."
            )
        with comm.phase("the local multi-task backward"):
            stash = _take_grads(params)
            stashed_jacs = [get_jac(p) for p in shared]
            if any(j is not None for j in stashed_jacs):
                raise ValueError(
                    "Shared parameters already hold a .jac before the step; call zero_grad() in "
                    "the closure."
                )
            mtl_backward(
                losses,
                features,
                tasks_params=optimizer._tasks_params,
                shared_params=shared,
                parallel_chunk_size=optimizer.parallel_chunk_size,
            )
            tasks = losses.numel()
            jacobians = [_or_zeros(get_jac(p), (tasks, *p.shape), p) for p in shared]
            grads = [_or_zeros(p.grad, tuple(p.shape), p) for p in others]
        reduced = comm.all_reduce_sum(jacobians + grads)
        scale = 1.0 / comm.world_size
        with comm.phase("the aggregation"):
            for param, jacobian in zip(shared, reduced[: len(shared)], strict=True):
                setattr(param, "jac", jacobian * scale)  # noqa: B010
                param.grad = None
            for param, grad in zip(others, reduced[len(shared) :], strict=True):
                param.grad = grad * scale
            method = optimizer._method
            aggregator = (
                optimizer._jacobian_aggregator
                if method.path == "jacobian"
                else _gramian_aggregator(optimizer._gramian_weighting)
            )
            from jdoptim.autojac import jac_to_grad

            jac_to_grad(shared, aggregator)
        synced = comm.broadcast_from_first(
            torch.cat([_or_zeros(p.grad, tuple(p.shape), p).reshape(-1) for p in shared])
        )
        offset = 0
        for param in shared:
            param.grad = synced[offset : offset + param.numel()].reshape(param.shape)
            offset += param.numel()
        _restore(params, stash)
        return self._global_losses(losses, None)

    # --- shared pieces ---------------------------------------------------------------------------

    def global_losses(self, losses: Tensor, optimizer: JacobianDescent) -> Tensor:
        """The global losses for local ``losses`` (as :meth:`fill_grad` returns them)."""
        if optimizer._shared_params is not None:
            return self._global_losses(losses, None)
        return self._global_losses(losses, self._layout(losses, optimizer.batch_dim))

    def _global_losses(self, losses: Tensor, layout: _Layout | None) -> Tensor:
        """Instance-wise losses concatenated over ranks; task or scalar losses averaged."""
        detached = losses.detach()
        if layout is None:
            (total,) = self.communicator.all_reduce_sum([detached])
            return total / self.communicator.world_size
        (gathered,) = self.communicator.all_gather_padded([detached], [layout.dim])
        return gathered

    def _layout(self, losses: Tensor, batch_dim: int | None) -> _Layout | None:
        """Every rank's losses shape; ``None`` when the losses are scalars (a plain step)."""
        shapes = [_shape_of(s) for s in self.communicator.all_gather_ints(_shape_header(losses))]
        ndims = {len(shape) for shape in shapes}
        if len(ndims) != 1:
            raise ValueError(
                f"The ranks returned losses with different numbers of dims: {shapes}; every rank "
                "must return losses of the same kind."
            )
        if losses.ndim == 0:
            return None
        dim = (0 if batch_dim is None else batch_dim) % losses.ndim
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

    def _reduce_grads(
        self, params: Sequence[Tensor], stash: Sequence[Tensor | None], scale: float
    ) -> None:
        grads = [_or_zeros(p.grad, tuple(p.shape), p) for p in params]
        reduced = self.communicator.all_reduce_sum(grads)
        for param, grad in zip(params, reduced, strict=True):
            param.grad = grad if scale == 1.0 else grad * scale
        _restore(params, stash)


class _Layout:
    """Where this rank's losses sit in the global losses."""

    def __init__(self, shape: tuple[int, ...], dim: int, offset: int, size: int) -> None:
        self.shape = shape
        self.dim = dim
        self.offset = offset
        self.size = size

    def local_slice(self, weights: Tensor) -> Tensor:
        return weights.narrow(self.dim, self.offset, self.size)

    def natural_order(self, device: torch.device) -> Tensor:
        """Flat index in the global losses of each instance-major row."""
        rows = torch.arange(math.prod(self.shape), device=device)
        return rows.reshape(self.shape).movedim(self.dim, 0).reshape(-1)


def _shape_header(losses: Tensor) -> list[int]:
    if losses.ndim > _MAX_LOSS_DIMS:
        raise ValueError(f"Distributed steps support losses of up to {_MAX_LOSS_DIMS} dims.")
    return [losses.ndim, *losses.shape, *([0] * (_MAX_LOSS_DIMS - losses.ndim))]


def _shape_of(header: list[int]) -> tuple[int, ...]:
    return tuple(header[1 : 1 + header[0]])


def _take_grads(params: Sequence[Tensor]) -> list[Tensor | None]:
    """Each param's current ``.grad`` (set to ``None``), so the step reduces only its own part."""
    stash = [p.grad for p in params]
    for p in params:
        p.grad = None
    return stash


def _restore(params: Sequence[Tensor], stash: Sequence[Tensor | None]) -> None:
    for param, old in zip(params, stash, strict=True):
        if old is not None:
            param.grad = old if param.grad is None else param.grad + old


def _or_zeros(tensor: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_zeros(shape)
