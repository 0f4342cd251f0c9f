"""Hugging Face accelerate: ``backward`` stands in for ``accelerator.backward`` with a vector of losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    import accelerate
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jdoptim.integrations.accelerate needs Hugging Face accelerate: "
        "pip install jdoptim[accelerate]"
    ) from error

from jdoptim.optim import JacobianDescent
from jdoptim.paths import StepRecord

__all__ = ["backward", "jacobian_descent_optimizer"]


def backward(
    accelerator: accelerate.Accelerator,
    optimizer: Optimizer,
    losses: Tensor | list[Tensor] | tuple[Tensor, ...],
    *,
    features: Any = None,
) -> StepRecord:
    """Fills ``.grad`` by Jacobian descent from ``losses``, where ``accelerator.backward(loss)`` would.

    ``accelerator.backward`` needs a scalar; this does the same bookkeeping for a vector of losses:
    the accelerator's ``GradScaler`` (``mixed_precision="fp16"``) scales them, and inside
    ``accelerator.accumulate(model)`` the micro-batches add up exactly. Per-instance losses
    (``batch_dim`` set) concatenate, so the accumulated step equals the step on the whole batch;
    per-task losses are divided by ``gradient_accumulation_steps`` as accelerate does for a mean loss,
    so their sum is the whole batch's mean. ``optimizer`` is what ``prepare`` returned (or the
    jdoptim optimizer itself). Returns the step record (``optimizer.step()`` returns ``None``
    through accelerate's wrapper; the record's ``losses`` are the ones to log).
    """
    jd_optimizer = jacobian_descent_optimizer(optimizer)
    # Per-task losses as a list of scalars: one tensor, which the scaler scales as one.
    stacked = losses if isinstance(losses, Tensor) else torch.stack(list(losses))
    if jd_optimizer.batch_dim is None and accelerator.gradient_accumulation_steps > 1:
        stacked = stacked / accelerator.gradient_accumulation_steps
    if accelerator.scaler is not None:
        stacked = accelerator.scaler.scale(stacked)
    # Under accelerator.autocast() the Gramian, Jacobian and weights must stay in full precision.
    with torch.autocast(stacked.device.type, enabled=False):
        return jd_optimizer.backward(stacked, features=features)


def jacobian_descent_optimizer(optimizer: Optimizer) -> JacobianDescent:
    """The jdoptim optimizer inside what ``accelerator.prepare`` returned (or ``optimizer`` itself)."""
    found: Any = optimizer
    while not isinstance(found, JacobianDescent):
        inner = getattr(found, "optimizer", None)
        if not isinstance(inner, Optimizer):
            raise TypeError(
                f"{type(optimizer).__name__} is not a jdoptim optimizer, nor a wrapper around one: "
                "pass what accelerator.prepare(JDSGD(...)) returned."
            )
        found = inner
    return found
