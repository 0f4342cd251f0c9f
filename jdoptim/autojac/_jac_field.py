"""The ``.jac`` field: a plain attribute holding a tensor's accumulated Jacobian, like ``.grad``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from jdoptim.autojac._graph import unique

_FIELD = "jac"


def get_jac(tensor: Tensor) -> Tensor | None:
    """The Jacobian accumulated in ``tensor.jac``, or ``None``."""
    value = getattr(tensor, _FIELD, None)
    return value if isinstance(value, Tensor) else None


def has_jac_field(tensor: Tensor) -> bool:
    """Whether a backward pass has set ``tensor.jac`` (to a Jacobian, or to ``None`` when the
    differentiated outputs did not reach the tensor)."""
    return hasattr(tensor, _FIELD)


def accumulate_jac(tensors: Sequence[Tensor], jacobians: Sequence[Tensor | None]) -> None:
    """Adds each Jacobian to its tensor's ``.jac`` (sets it when absent), checking shapes first.

    ``None`` (a tensor the outputs do not reach) leaves an existing ``.jac`` as it is and otherwise
    sets ``.jac = None``: like a ``.grad`` of ``None``, no Jacobian, which is not a zero one.
    """
    for index, (tensor, jacobian) in enumerate(zip(tensors, jacobians, strict=True)):
        existing = get_jac(tensor)
        if existing is not None and jacobian is not None and existing.shape != jacobian.shape:
            raise ValueError(
                f"inputs[{index}] already has a .jac of shape {tuple(existing.shape)}, which cannot "
                f"be summed with the new Jacobian of shape {tuple(jacobian.shape)} (a different "
                "number of rows). Call jac_to_grad or clear_jac before differentiating other "
                "outputs."
            )
    for tensor, jacobian in zip(tensors, jacobians, strict=True):
        existing = get_jac(tensor)
        if jacobian is None:
            setattr(tensor, _FIELD, existing)
        else:
            setattr(tensor, _FIELD, jacobian if existing is None else existing + jacobian)


def clear_jac(tensors: Tensor | Iterable[Tensor]) -> None:
    """Removes the ``.jac`` field of each tensor (the analogue of setting ``.grad`` to ``None``)."""
    for tensor in unique([tensors] if isinstance(tensors, Tensor) else tensors):
        if hasattr(tensor, _FIELD):
            delattr(tensor, _FIELD)
