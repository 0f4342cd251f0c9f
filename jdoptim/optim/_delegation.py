"""How ``JacobianDescent`` shares the wrapped optimizer's ``param_groups`` and ``state``.

They are properties that read and write the wrapped optimizer's; until it is set (during
``Optimizer.__init__``) they hold what ``Optimizer.__init__`` stores, and a trainer's wrapper that
subclasses ``JacobianDescent`` without running its ``__init__`` (Lightning's ``LightningOptimizer``)
reaches them through its own ``__getattr__``.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


def inner_or(optimizer: Optimizer, name: str, fallback: str) -> Any:
    """``name`` of the wrapped optimizer; until it is set, what ``Optimizer.__init__`` stored."""
    inner = optimizer.__dict__.get("optimizer")
    if inner is not None:
        return getattr(inner, name)
    if fallback in optimizer.__dict__:
        return optimizer.__dict__[fallback]
    # A wrapper whose class subclasses ours without running our __init__ (Lightning's
    # LightningOptimizer): AttributeError makes Python ask the wrapper's __getattr__, which forwards.
    raise AttributeError(name)


def set_inner_or(optimizer: Optimizer, name: str, fallback: str, value: Any) -> None:
    inner = optimizer.__dict__.get("optimizer")
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
