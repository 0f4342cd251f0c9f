"""Post-accumulate-grad hooks (``Tensor.register_post_accumulate_grad_hook``) run once per write.

Autograd runs a parameter's post-accumulate-grad hooks after each backward pass accumulates into
its ``.grad``. jdoptim's step runs several internal passes (and may write ``.grad`` without
one), so the hooks are held during them and run once each ``backward``/``step`` has written the
final ``.grad``, as after a ``loss.backward()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor


@contextmanager
def post_accumulate_hooks_held(params: list[Tensor]) -> Iterator[None]:
    """Holds the hooks of ``params`` (the same dicts emptied, then refilled: autograd keeps a
    reference to each)."""
    held: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
    for param in params:
        hooks = param._post_accumulate_grad_hooks
        if hooks:
            held.append((hooks, dict(hooks)))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, saved in held:
            hooks.update(saved)


def run_post_accumulate_hooks(params: list[Tensor]) -> None:
    """Runs the hooks of each parameter that has a ``.grad``, in registration order."""
    for param in params:
        hooks = param._post_accumulate_grad_hooks
        if hooks and param.grad is not None:
            for hook in list(hooks.values()):
                hook(param)
