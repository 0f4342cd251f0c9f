"""The scale a ``GradScaler`` multiplied losses by, read from their autograd graph.

``scaler.scale(losses)`` is ``losses * s`` with ``s`` the scaler's one-entry float32 scale, always a
power of two. Given such losses and no ``grad_scaler``, :meth:`JacobianDescent.backward` still
computes the weights on ``losses / s`` (exact), as it does with ``grad_scaler=``: for a method whose
weights depend on the losses' scale (NashMTL...), weights of the scaled losses would make the step
``s`` times too small once the scaler unscales ``.grad``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

# Constant factors looked through, after the scale (Lightning's accumulation, a loss weight...).
_MOST_FACTORS = 4
# A scaler's scale starts at 2^16 and halves on each overflow; before any scale was recognised, a
# power of two below this is more likely a loss weight (2, 4, 8...), not to be divided out.
FIRST_SMALLEST_SCALE = 2.0**8


def smallest_scale(last: float | None) -> float:
    """The smallest factor taken for a scaler's scale, given the last one recognised: a scaler
    that has backed off below 2^8 is followed down (to 2), halving by halving."""
    return FIRST_SMALLEST_SCALE if last is None else max(2.0, min(FIRST_SMALLEST_SCALE, last / 4))


def grad_scaler_scale(losses: Any, smallest: float = FIRST_SMALLEST_SCALE) -> float | None:
    """``s`` when ``losses`` is ``x * s`` for a tensor ``s`` shaped as a ``GradScaler``'s scale (one
    float32 entry, a constant, a power of two from ``smallest`` up), else ``None``.

    Also through constant factors and divisors applied after the scale (``scaler.scale(l) * k``, as
    Lightning's accumulation does, or ``/ k``), and for a list or tuple of losses scaled alike
    (``scaler.scale([l1, l2])`` scales each). One host read per float32 factor on the way.
    """
    if isinstance(losses, list | tuple):
        scales = {
            _scale_of(item, smallest) if isinstance(item, Tensor) else None for item in losses
        }
        return scales.pop() if len(scales) == 1 else None
    return _scale_of(losses, smallest) if isinstance(losses, Tensor) else None


def _scale_of(losses: Tensor, smallest: float) -> float | None:
    node = losses.grad_fn
    for _ in range(_MOST_FACTORS):
        if node is None or node.name() not in ("MulBackward0", "DivBackward0"):
            return None
        try:
            factor = getattr(node, "_saved_other", None)  # the right operand of x * s
        except RuntimeError:  # freed by a backward
            return None
        if not isinstance(factor, Tensor) or factor.numel() != 1 or factor.requires_grad:
            return None
        if factor.dtype == torch.float32:
            value = float(factor.item())
            if value >= smallest and math.isfinite(value) and math.frexp(value)[0] == 0.5:
                # Divided by a scale-like factor: unscaled (x * s / s) or not a scaler's at all.
                return value if node.name() == "MulBackward0" else None
        node = node.next_functions[0][0]  # a constant factor after the scale: look below it
    return None


def multiplied_by(losses: Any, factor: Tensor) -> bool:
    """Whether the graph of ``losses`` (a tensor, or a list or tuple of them) multiplies by
    ``factor`` itself (the same storage) anywhere: a ``GradScaler``'s scale tensor in losses that
    ``scaler.scale`` returned, then reshaped, joined or weighted. A walk of the graph, stopped at
    the first such product; no host read."""
    items = losses if isinstance(losses, list | tuple) else [losses]
    stack = [item.grad_fn for item in items if isinstance(item, Tensor)]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == "MulBackward0" and any(
            _is_storage_of(saved, factor) for saved in _saved_operands(node)
        ):
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _saved_operands(node: Any) -> list[Any]:
    operands = []
    for name in ("_saved_other", "_saved_self"):
        with contextlib.suppress(RuntimeError):  # freed by a backward
            operands.append(getattr(node, name, None))
    return operands


def _is_storage_of(saved: Any, factor: Tensor) -> bool:
    return (
        isinstance(saved, Tensor)
        and saved.device == factor.device
        and saved.numel() == factor.numel()
        and saved.data_ptr() == factor.data_ptr()
    )
