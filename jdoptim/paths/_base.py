"""The interface every path implements, and the small interface a path needs from its owner.

A step runs in three stages, whoever drives it (``step(closure)``, backward-then-step, several
micro-batches, several ranks):

1. :meth:`Path.differentiate` turns one forward pass's losses into a :class:`Part`: what the path
   keeps of that batch (Gramian terms, Jacobian rows, task Jacobians, gradients).
2. :meth:`Path.combine` merges the parts of several micro-batches into the part of their
   concatenation (instances) or their sum (per-task losses).
3. :meth:`Path.apply` weighs one part and *adds* the direction to ``.grad``, returning a
   :class:`~jdoptim.paths.StepRecord`.

A distributed variant wraps a local path and only changes stage 3 (it exchanges the part first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.paths._method import Method
from jdoptim.paths._record import StepRecord


class NonFiniteGramianError(ValueError):
    """The Gramian (or Jacobian) of finite losses is not finite: overflow, usually under fp16.

    Under loss scaling the owner turns it into a skipped step (non-finite ``.grad``) instead.
    """


@dataclass
class StepContext:
    """What a path needs from the optimizer that owns it, and nothing more.

    Attributes:
        params: the trainable parameters, in group order (called at each step: groups change).
        engine: the autogram engine covering them (built and rebuilt by the owner).
        batch_dim: the losses' instance dim, or ``None`` for per-task losses.
        fuse_backward: build ``.grad`` from the engine's saved terms instead of a second backward.
        parallel_chunk_size: rows per batched backward pass on the autojac paths.
        shared_params: multi-task mode: the trunk's parameters.
        tasks_params: multi-task mode: each head's parameters (``None``: inferred).
    """

    params: Callable[[], list[Tensor]]
    engine: Callable[[], Engine]
    batch_dim: int | None = None
    fuse_backward: bool = True
    parallel_chunk_size: int | None = None
    shared_params: list[Tensor] | None = None
    tasks_params: list[list[Tensor]] | None = None


@dataclass
class Part:
    """What a path keeps of one batch: its detached losses, plus the path's own fields.

    ``scale`` is the loss scale (a ``GradScaler``'s) the batch was differentiated with: weights are
    computed from unscaled values, and ``.grad`` receives the scaled direction, as the scaler
    expects.
    """

    losses: Tensor
    scale: float = field(default=1.0, kw_only=True)


@dataclass
class GradsPart(Part):
    """A batch reduced to plain gradients (a scalar loss, a scalarizer)."""

    grads: list[Tensor | None]
    weights: Tensor | None = None


class Path(ABC):
    """Turns losses into ``.grad`` for one kind of method (see the module docstring)."""

    def __init__(self, method: Method, context: StepContext) -> None:
        self.method = method
        self.context = context

    @property
    def module(self) -> nn.Module:
        return self.method.module

    def forward_context(self) -> AbstractContextManager[Any]:
        """Wraps the forward pass of a closure (the engine records layer calls here)."""
        return nullcontext()

    def start_watching(self) -> None:  # noqa: B027 - optional for paths that need no forward hooks
        """Backward-then-step: from now on, observe forward passes the user runs himself."""

    def watch_first_forward(self) -> None:  # noqa: B027 - optional, as start_watching
        """Called when the optimizer is built: observe forward passes until the first step, so
        that a first ``backward`` finds the layers of the forward before it already known."""

    def begin(self) -> None:  # noqa: B027 - optional: paths that keep per-step bookkeeping
        """Called when a step (or a ``backward``) starts."""

    def guard(self, stage: str) -> AbstractContextManager[Any]:
        """Wraps the caller's local work (the closure): errors propagate, or, across ranks, are
        held until the next exchange so that every rank raises together."""
        return nullcontext()

    def stop_watching(self) -> None:  # noqa: B027 - optional, as start_watching
        """Stops observing forward passes (the engine is about to be replaced)."""

    def run(
        self, losses: Tensor, features: Any, scale: float, next_losses: Callable[[], Tensor]
    ) -> StepRecord:
        """The whole step of ``step(closure)`` from the closure's first result.

        ``next_losses`` runs the closure again (paths that need several batches per step).
        """
        return self.apply(self.differentiate(losses, features, scale))

    def overflowed(self, losses: Tensor) -> None:  # noqa: B027 - only ranks need to agree
        """This batch's scaled ``losses`` overflowed: the owner skips the step (loss scaling).

        Locally nothing is left to do; across ranks, the other ranks learn it at their step's first
        exchange and skip the step too.
        """

    def global_losses(self, losses: Tensor) -> Tensor:
        """The losses as the step sees them (every rank's, in distributed mode)."""
        return losses.detach()

    def supports_backward(self) -> bool:
        """Whether losses from the user's own forward pass can be taken (not only a closure)."""
        return True

    def shared_base(self, grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
        """The ``.grad`` an accumulation window opens on (a plain ``loss.backward()`` run before
        it), as the step adds it: on one process, as it is."""
        return grads

    @abstractmethod
    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        """What this path keeps of one batch's ``losses`` (``features``: multi-task mode).

        ``scale``: differentiate ``scale * losses`` (loss scaling for float16).
        """

    @abstractmethod
    def combine(self, parts: Sequence[Part]) -> Part:
        """The part of the concatenated (or, per task, summed) micro-batches."""

    @abstractmethod
    def apply(self, part: Part) -> StepRecord:
        """Weighs ``part`` and adds the direction to ``.grad``; nothing changes if it raises."""

    # --- pieces shared by the paths ---------------------------------------------------------------

    def grads_part(self, losses: Tensor, loss: Tensor, scale: float) -> GradsPart:
        """The gradients of the scalar ``scale * loss`` (``losses``: the values to report)."""
        params = self.context.params()
        scaled = loss * scale if scale != 1.0 else loss
        grads = torch.autograd.grad(scaled, params, allow_unused=True)
        return GradsPart(losses.detach(), list(grads), scale=scale)

    def combine_grads(self, parts: Sequence[Part]) -> GradsPart:
        """Micro-batches reduced to gradients add them up; their losses are joined as the
        other parts' are (summed per task, concatenated along ``batch_dim``)."""
        grads_parts = [p for p in parts if isinstance(p, GradsPart)]
        assert len(grads_parts) == len(parts), "check_same_kind() comes first"
        first = grads_parts[0]
        if len(grads_parts) == 1:
            return first
        grads: list[Tensor | None] = list(first.grads)
        for part in grads_parts[1:]:
            grads = [_add(a, b) for a, b in zip(grads, part.grads, strict=True)]
        losses = [p.losses for p in grads_parts]
        batch_dim = self.context.batch_dim
        if first.losses.ndim > 0 and batch_dim is not None:
            combined = torch.cat(losses, dim=batch_dim % first.losses.ndim)
            return GradsPart(combined, grads, scale=first.scale)
        if any(loss.shape != first.losses.shape for loss in losses):
            raise ValueError(
                "Without batch_dim the losses are per task and micro-batches add up: every "
                f"backward() of a step must give the same number of them; got shapes "
                f"{sorted({tuple(loss.shape) for loss in losses})}."
            )
        combined = torch.stack(losses).sum(dim=0)
        return GradsPart(combined, grads, first.weights, scale=first.scale)

    def apply_grads(self, part: Part) -> StepRecord:
        assert isinstance(part, GradsPart)
        add_to_grad(self.context.params(), part.grads)
        return StepRecord(part.losses, part.weights)


def add_to_grad(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """Adds each gradient to its parameter's ``.grad`` (``None``: left as it is), as autograd does."""
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        grad = grad.to(param.dtype)
        param.grad = grad.clone() if param.grad is None else param.grad + grad


def add_direction(params: Sequence[Tensor], direction: Tensor) -> None:
    """Splits the flat ``direction`` over the params and adds it to their ``.grad``."""
    add_to_grad(params, split_flat(direction, params))


def split_flat(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    pieces: list[Tensor | None] = []
    offset = 0
    for param in params:
        pieces.append(flat[offset : offset + param.numel()].reshape(param.shape))
        offset += param.numel()
    return pieces


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def check_same_kind(parts: Sequence[Part]) -> None:
    """Micro-batches of one step must all be scalars or all be vectors of losses."""
    kinds = {type(p) for p in parts}
    if len(kinds) > 1:
        raise ValueError(
            "The micro-batches of one step gave losses of different kinds (a scalar for some, a "
            "vector for others); give every backward() losses of the same kind."
        )
