"""The scale a ``GradScaler`` multiplied losses by, read from their autograd graph.

``scaler.scale(losses)`` is ``losses * s`` with ``s`` the scaler's one-entry float32 scale, always a
power of two. Given such losses and no ``grad_scaler``, :meth:`JacobianDescent.backward` still
computes the weights on ``losses / s`` (exact), as it does with ``grad_scaler=``: for a method whose
weights depend on the losses' scale (NashMTL...), weights of the scaled losses would make the step
``s`` times too small once the scaler unscales ``.grad``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def grad_scaler_scale(losses: Tensor) -> float | None:
    """``s`` when ``losses`` is ``x * s`` for a tensor ``s`` shaped as a ``GradScaler``'s scale (one
    float32 entry, a constant, a power of two from 2 up), else ``None``. One host read when the
    graph matches."""
    node = losses.grad_fn
    if node is None or node.name() != "MulBackward0":
        return None
    try:
        factor = getattr(node, "_saved_other", None)  # the right operand of x * s
    except RuntimeError:  # freed by a backward
        return None
    if (
        not isinstance(factor, Tensor)
        or factor.numel() != 1
        or factor.dtype != torch.float32
        or factor.requires_grad
    ):
        return None
    value = float(factor.item())
    # A scaler's scale starts at 2^16 and halves only on overflows; a factor below 2 is more
    # likely a loss weight (0.5...), which must not be taken for one.
    if not value >= 2 or not math.isfinite(value) or math.frexp(value)[0] != 0.5:
        return None
    return value
