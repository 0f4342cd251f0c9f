"""Removing module hooks without breaking a ``torch.compile`` that is under way.

The optimizers put global module hooks on while they watch forward passes (the engine's discovery,
DDP and ``fully_shard`` detection) and take them off when done, or when garbage collection drops
them. Collection can run in the middle of a dynamo compile whose guards read torch's global hook
tables by key; an entry removed then fails that compile (``KeyError`` in a guard). So while a frame
compiles, a removal waits until the next removal or watch outside a compile; the hook itself must
go inert at once (see :func:`guarded`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch._guards import CompileContext
from torch.utils.hooks import RemovableHandle

_deferred: list[RemovableHandle] = []


def guarded(hook: Callable[..., None]) -> tuple[Callable[..., None], Callable[[], None]]:
    """``hook`` behind a switch: returns the hook to register and the function that turns it off."""
    live = [True]

    def call(*args: Any) -> None:
        if live[0]:
            hook(*args)

    def turn_off() -> None:
        live[0] = False

    return call, turn_off


def remove_hook(handle: RemovableHandle) -> None:
    """Removes a module hook, global or not, now, or after the compile under way (its hook must be
    inert meanwhile): garbage collection may close an engine in the middle of a compile."""
    if compiling():
        _deferred.append(handle)
        return
    remove_deferred_hooks()
    _remove(handle)


def remove_deferred_hooks() -> None:
    """Removes the hooks whose removal waited for a compile to end (a no-op during one)."""
    if compiling():
        return
    while _deferred:
        _remove(_deferred.pop())


def compiling() -> bool:
    """Whether dynamo is compiling a frame right now (torch's compile context is set)."""
    return CompileContext.try_get() is not None


def _remove(handle: RemovableHandle) -> None:
    handle.remove()
    # torch 2.13's handle leaves the hook's id in the with_kwargs table, and any entry there
    # counts as a global hook (dynamo and torch.compile warn about them forever).
    nn.modules.module._global_forward_hooks_with_kwargs.pop(handle.id, None)
