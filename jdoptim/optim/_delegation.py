"""How ``JacobianDescent`` shares the wrapped optimizer's ``param_groups``, ``state`` and step hooks.

They are properties that read and write the wrapped optimizer's; until it is set (during
``Optimizer.__init__``) they hold what ``Optimizer.__init__`` stores, and a trainer's wrapper that
subclasses ``JacobianDescent`` without running its ``__init__`` (Lightning's ``LightningOptimizer``)
reaches them through its own ``__getattr__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.optim import Optimizer
from torch.optim import optimizer as torch_optimizer


def wrapped(optimizer: Optimizer) -> Optimizer | None:
    """The optimizer ``optimizer`` wraps; ``None`` until it is set (during ``Optimizer.__init__``),
    and in a trainer's wrapper that subclasses ``JacobianDescent`` without running its
    ``__init__``."""
    inner: Optimizer | None = optimizer.__dict__.get("optimizer")
    return inner


def inner_or(optimizer: Optimizer, name: str, fallback: str) -> Any:
    """``name`` of the wrapped optimizer; until it is set, what ``Optimizer.__init__`` stored."""
    inner = wrapped(optimizer)
    if inner is not None:
        return getattr(inner, name)
    if fallback in optimizer.__dict__:
        return optimizer.__dict__[fallback]
    # A wrapper whose class subclasses ours without running our __init__ (Lightning's
    # LightningOptimizer): AttributeError makes Python ask the wrapper's __getattr__, which forwards.
    raise AttributeError(name)


def set_inner_or(optimizer: Optimizer, name: str, fallback: str, value: Any) -> None:
    inner = wrapped(optimizer)
    if inner is None and fallback not in optimizer.__dict__:
        inner = _forwarded_inner(optimizer)
    if inner is not None:
        setattr(inner, name, value)
        return
    optimizer.__dict__[fallback] = value


def _forwarded_inner(optimizer: Optimizer) -> Optimizer | None:
    """The wrapped torch optimizer, reached through a forwarding wrapper's ``__getattr__``."""
    forward = getattr(type(optimizer), "__getattr__", None)
    if forward is None:
        return None
    try:
        inner = forward(optimizer, "optimizer")
    except AttributeError:
        return None
    return inner if isinstance(inner, Optimizer) else None


@contextmanager
def global_step_hooks_held() -> Iterator[None]:
    """torch's global optimizer step hooks, held back while the wrapped optimizer steps.

    They run for the ``JacobianDescent`` step that drives the wrapped one (its ``step`` is a torch
    optimizer's, with their hooks); without this they ran a second time, with the wrapped optimizer,
    for one step of training. The wrapped optimizer's own hooks still run.
    """
    tables: tuple[dict[int, Any], ...] = (
        torch_optimizer._global_optimizer_pre_hooks,
        torch_optimizer._global_optimizer_post_hooks,
    )
    if not any(tables):  # the usual case: nothing to hold
        yield
        return
    saved = [dict(table) for table in tables]
    for table in tables:
        table.clear()
    try:
        yield
    finally:
        for table, hooks in zip(tables, saved, strict=True):
            added = dict(table)  # registered during the step: after the others, as they came
            table.clear()
            table.update(hooks)
            table.update(added)
