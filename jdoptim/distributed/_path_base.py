"""The distributed variant of each path: the local path's work, plus the exchanges between ranks.

With ``R`` ranks and a ``batch_dim``, rank ``r``'s losses are its slice of the global losses,
concatenated along ``batch_dim`` in rank order. Without ``batch_dim`` (and in multi-task mode)
the losses are per task: the global loss of task ``t`` is the mean over ranks of the per-rank
losses (each the mean over an equally sized local batch, as DDP assumes). Every rank computes the
same global Gramian (or Jacobian), rank 0's weights are shared so that every rank applies
bit-identical values, each rank builds the gradient of its own losses under its slice of the
weights, and one all-reduce sums them. Every exchange starts with a header of the same length,
and failures ride in the next collective, so a failing rank makes every rank raise, never hang.

Under float16 loss scaling (a ``GradScaler``), every verdict on an overflow is one the ranks share:
a rank whose scaled losses overflowed says so in the step's first exchange, rank 0's weights (or
direction) are NaN when its Gramian (or Jacobian) overflowed, and overflowing gradients are summed
into every rank's. Every rank then skips the step alike, and its scaler backs off alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from jdoptim._grad_layout import stored_values
from jdoptim.distributed._communicator import Communicator, StepOverflow, from_first_rank
from jdoptim.distributed._layout import (
    Layout,
    StepKind,
    header,
    layout_of,
    method_code,
    same_shapes,
    shapes_of,
)
from jdoptim.paths import GradsPart, Part, Path, StepRecord, add_direction


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

    def overflowed(self, losses: Tensor) -> None:
        """Takes part in the step's first exchange only, telling every rank to skip the step."""
        self.communicator.overflow = True
        try:
            self.apply(FailedPart(losses.detach()))
        except StepOverflow:
            return
        raise RuntimeError("An overflowing rank passed the step's first exchange.")

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
        headers = self.communicator.exchange_ints(
            [0, 0, *header(kind, losses, method=self.method_code)]
        )
        return [h[2:] for h in headers]

    @functools.cached_property
    def method_code(self) -> int:
        """:func:`method_code` of this rank's method, sent in every header."""
        return method_code(self.local.module)

    def layout(self, headers: list[list[int]]) -> Layout | None:
        return layout_of(shapes_of(headers), self.context.batch_dim, self.communicator.rank)

    def shared_base(self, grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
        """Averaged over the ranks, as DDP averages a plain backward's gradients (its own
        synchronisation is off during jdoptim's steps): each rank's base differed otherwise, and
        so did the replicas. Only the parameters some rank holds a non-zero ``.grad`` for are
        reduced (``zero_grad(set_to_none=False)`` leaves zeros everywhere: nothing to send); one
        small exchange, then one all-reduce if any rank holds one."""
        present = [index for index, grad in enumerate(grads) if grad is not None]
        held = [0] * len(grads)
        if present:  # one host read for all of them
            values = [stored_values(grads[index]).any() for index in present]  # type: ignore[arg-type]
            for index, nonzero in zip(present, torch.stack(values).tolist(), strict=True):
                held[index] = int(nonzero)
        anywhere = [
            max(column) for column in zip(*self.communicator.exchange_ints(held), strict=True)
        ]
        chosen = [index for index, flag in enumerate(anywhere) if flag]
        if not chosen:
            return grads
        summed = self.communicator.all_reduce_sum(
            [or_zeros(grads[i], params[i]) for i in chosen], kind="gradients"
        )
        shared = list(grads)
        for index, total in zip(chosen, summed, strict=True):
            shared[index] = total / self.communicator.world_size
        return shared

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
        grads = [or_zeros(p.grad, p) for p in params]
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

    def set_direction(self, direction: Tensor, scale: float = 1.0) -> None:
        """Adds rank 0's ``direction``, times the loss ``scale``, to ``.grad`` on every rank."""
        (shared,) = self.communicator.all_reduce_sum(
            [from_first_rank(direction, self.communicator.rank)], kind="direction"
        )
        check_shared([shared], "direction")
        add_direction(self.context.params(), shared * scale if scale != 1.0 else shared)

    def task_means(self, part: Part, kind: StepKind, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Every rank's ``tensors`` and losses averaged over the ranks (per-task losses)."""
        shapes = shapes_of(self.exchange_header(kind, losses_of(part)))
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


def check_shared(shared: Sequence[Tensor], what: str) -> None:
    """Raises :class:`StepOverflow` when the ``what`` rank 0 shared is not finite (rank 0's
    Gramian or Jacobian overflowed, and it shared NaN instead of failing): every rank holds the
    same values, so every rank raises here alike."""
    if shared and not bool(torch.stack([torch.isfinite(t).all() for t in shared]).all()):
        raise StepOverflow(
            f"The {what} shared by rank 0 hold NaN or infinity: the Gramian (or Jacobian) of the "
            "losses is not finite. Under float16 loss scaling every rank skips this step; "
            "otherwise, look for diverging losses (a learning rate too large)."
        )


def overflow_as_nan(like: Tensor) -> Tensor:
    """What a rank weighs with after its Gramian or Jacobian overflowed: NaN, which rank 0 shares."""
    return torch.full_like(like, float("nan"))


def losses_of(part: Part) -> Tensor | None:
    return None if isinstance(part, FailedPart) else part.losses


def or_zeros(tensor: Tensor | None, like: Tensor) -> Tensor:
    return tensor if tensor is not None else like.new_zeros(like.shape)
