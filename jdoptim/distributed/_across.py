"""Choosing, once, whether a path runs locally or across ranks, and switching when DDP shows up."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jdoptim.distributed._ddp import ddp_process_group, watch_ddp
from jdoptim.distributed._fsdp import fsdp_root, sharded_model, watch_fsdp
from jdoptim.distributed._fsdp_paths import ShardedPath, sharded_variant
from jdoptim.distributed._paths import DistributedPath, distributed_variant
from jdoptim.paths import Part, Path, StepRecord

_T = TypeVar("_T")
_R = TypeVar("_R")


def across_ranks(
    path: Path,
    process_group: dist.ProcessGroup | bool | None,
    modules: Sequence[nn.Module] | None,
    grad_scaler: torch.amp.GradScaler | None,
) -> Path:
    """``path``, or a wrapper that runs it across the ranks of a process group.

    The group is ``process_group``, or the group of a ``DistributedDataParallel`` model in
    ``modules``, or, when ``torch.distributed`` is in use, that of the first DDP model the forward
    pass runs. ``process_group=False`` keeps every step local.
    """
    if process_group is False:
        return path
    if process_group is True or (
        process_group is not None and not isinstance(process_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup (such as "
            "torch.distributed.group.WORLD or ddp_model.process_group), None (found from a DDP "
            f"model) or False (local steps), got {process_group!r}."
        )
    root = fsdp_root(modules) if process_group is None else None
    group = process_group if process_group is not None else ddp_process_group(modules)
    if group is not None and not dist.is_initialized():
        raise ValueError(
            "process_group= was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
        )
    wrapper = RankAwarePath(path, grad_scaler)
    if root is not None:
        wrapper.shard_with(root)
    elif group is not None:
        wrapper.use_group(group)
    if dist.is_available() and dist.is_initialized():
        wrapper.watch_for_models()
    return wrapper


class RankAwarePath(Path):
    """Runs ``local`` on this rank's losses until a process group is known, then across ranks."""

    def __init__(self, local: Path, grad_scaler: torch.amp.GradScaler | None) -> None:
        super().__init__(local.method, local.context)
        self.local = local
        self.grad_scaler = grad_scaler
        self.distributed: DistributedPath | None = None
        self._watch = ExitStack()
        weakref.finalize(self, self._watch.close)
        self._trains: weakref.WeakKeyDictionary[nn.Module, tuple[int, bool]] = (
            weakref.WeakKeyDictionary()
        )

    def use_group(self, group: dist.ProcessGroup) -> None:
        if self.distributed is not None:
            return
        self.distributed = distributed_variant(self.local, group)

    @property
    def active(self) -> Path:
        return self.local if self.distributed is None else self.distributed

    def forward_context(self) -> AbstractContextManager[Any]:
        return self.local.forward_context()

    def watch_for_models(self) -> None:
        """From now on, a DDP or ``fully_shard`` model's forward pass hands its group (or itself)
        to this path, which is weakly held. Called once, when the optimizer is built."""
        self._watch.enter_context(
            watch_ddp(_weakly(self.use_group, None), concerns=_weakly(self.trains, False))
        )
        self._watch.enter_context(watch_fsdp(_weakly(self.use_fsdp, None)))

    def begin(self) -> None:
        self.active.begin()

    @contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        if self.distributed is not None:
            with self.distributed.guard(stage):
                yield
            return
        try:
            yield
        except BaseException:
            if self.distributed is None:
                raise
            # The first step's forward pass found the DDP model before the closure failed: hold
            # the error as the distributed guard does, so that every rank raises together at the
            # step's first exchange (raising here left the other ranks waiting in it).
            with self.distributed.guard(stage):
                raise

    def start_watching(self) -> None:
        self.local.start_watching()

    def watch_first_forward(self) -> None:
        self.local.watch_first_forward()

    def stop_watching(self) -> None:
        self.local.stop_watching()

    def supports_backward(self) -> bool:
        return self.local.supports_backward()

    def shared_base(self, grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
        return self.active.shared_base(grads, params)

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        return self.active.differentiate(losses, features, scale)

    def combine(self, parts: Sequence[Part]) -> Part:
        return self.active.combine(parts)

    def apply(self, part: Part) -> StepRecord:
        return self.active.apply(part)

    def run(
        self, losses: Tensor, features: Any, scale: float, next_losses: Callable[[], Tensor]
    ) -> StepRecord:
        return self.active.run(losses, features, scale, next_losses)

    def overflowed(self, losses: Tensor) -> None:
        self.active.overflowed(losses)

    def global_losses(self, losses: Tensor) -> Tensor:
        return self.active.global_losses(losses)

    # --- fully_shard (FSDP2) models ----------------------------------------------------------------

    def shard_with(self, root: nn.Module) -> bool:
        """Runs every step across the ranks of the ``fully_shard`` model ``root``; whether the
        model's hooks were added by this call."""
        if self.distributed is not None:
            return False
        if self.grad_scaler is not None:
            raise ValueError(
                "grad_scaler is not supported on a fully_shard (FSDP2) model: each rank holds "
                "only its shard of the gradients, so the ranks' scalers could disagree on "
                "skipping a step. Train with bfloat16 parameters "
                "(fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))), "
                "which need no loss scaling, or in full precision; DDP models take grad_scaler=."
            )
        model, created = sharded_model(root)
        self.distributed = sharded_variant(self.local, model)
        return created

    def trains(self, model: nn.Module) -> bool:
        """Whether the optimizer trains some parameter of the DDP ``model`` (cached per model,
        until the optimizer's number of parameters changes)."""
        params = self.context.params()
        known = self._trains.get(model)
        if known is not None and known[0] == len(params):
            return known[1]
        ids = {id(param) for param in params}
        result = any(id(param) in ids for param in model.parameters())
        self._trains[model] = (len(params), result)
        return result

    def use_fsdp(self, root: nn.Module) -> None:
        """A forward pass of the ``fully_shard`` model ``root`` starts."""
        created = self.shard_with(root)
        if isinstance(self.distributed, ShardedPath):
            self.distributed.before_forward()
            if created:
                self.distributed.model.enter_call_in_progress()


def _weakly(method: Callable[[_T], _R], dead: _R) -> Callable[[_T], _R]:
    """Calls the bound ``method`` while its object lives (``dead`` once it is gone): a global hook
    must not keep a dropped optimizer (and its path) alive."""
    reference = weakref.WeakMethod(method)

    def call(argument: _T) -> _R:
        alive = reference()
        return dead if alive is None else alive(argument)

    return call
