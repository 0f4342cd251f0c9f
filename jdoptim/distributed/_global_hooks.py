"""Global module pre-hooks that an optimizer can drop at any moment, even while torch.compile runs.

The optimizer watches forward passes for DDP and ``fully_shard`` models with global pre-hooks, and
drops them when it is garbage-collected. Collection can happen in the middle of a dynamo compile
whose guards read torch's table of global hooks by key; an entry removed then breaks that compile
(``KeyError`` in a guard). So a dropped hook first stops doing anything, and its entry leaves the
table at the next safe point: when an optimizer is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

_dropped: list[RemovableHandle] = []


def remove_dropped_hooks() -> None:
    """Removes the entries of the hooks dropped so far (call it where no compile can be running)."""
    while _dropped:
        _dropped.pop().remove()


@contextmanager
def global_pre_hook(hook: Callable[[nn.Module, Any], None]) -> Iterator[None]:
    """Runs ``hook`` before every module's forward while the context is open."""
    remove_dropped_hooks()
    live = [True]

    def guarded(module: nn.Module, args: Any) -> None:
        if live[0]:
            hook(module, args)

    handle = nn.modules.module.register_module_forward_pre_hook(guarded)
    try:
        yield
    finally:
        live[0] = False
        _dropped.append(handle)
