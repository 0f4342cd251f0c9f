"""A guard shared by the stateful methods: state learnt for ``m`` objectives fits only ``m``."""

from __future__ import annotations

from torch import Tensor


class StateSizeError(ValueError):
    """A stateful method's state was learnt for another number of objectives than its input has."""


def check_state_rows(owner: object, state: Tensor, rows: int) -> None:
    """Raises :class:`StateSizeError` if ``state`` (first dim = objectives) was learnt for another
    ``m``."""
    if state.shape[0] != rows:
        raise StateSizeError(
            f"{owner!r} holds state for {state.shape[0]} objectives but got an input with {rows} "
            "rows; call reset() before changing the number of objectives."
        )


def check_state_shape(owner: object, state: Tensor, jacobian: Tensor) -> None:
    """:func:`check_state_rows`, then that per-coordinate state (``[m, n]``, like the Jacobian it
    summarises) was learnt for Jacobians of this exact shape."""
    check_state_rows(owner, state, jacobian.shape[0])
    if state.shape != jacobian.shape:
        raise ValueError(
            f"{owner!r} holds state for Jacobians of shape {tuple(state.shape)} but got one of shape "
            f"{tuple(jacobian.shape)}; call reset() before changing the parameters."
        )
