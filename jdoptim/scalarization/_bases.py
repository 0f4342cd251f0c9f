"""The scalarizer abstraction: a tensor of losses of any shape → one scalar loss.

A scalarizer is an ``nn.Module``: ``scalarizer(losses).backward()`` works with any torch optimizer.
Its ``__call__`` validates the losses (floating point, non-empty, finite) before :meth:`forward`
runs and checks that the result is one finite scalar, so bad inputs fail with a clear message.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

from torch import Tensor

from jdoptim._named import Named as _Named
from jdoptim.linalg import check_finite, check_tensor


class Scalarizer(_Named, ABC):
    """Maps a tensor of losses (any shape, at least one entry) to a scalar loss.

    Typical inputs are ``[T]`` (one loss per task) or ``[B, T]`` (per instance and task); methods
    with per-loss parameters (weights, learnable scales, logits) need the shape they were built for.
    """

    #: Whether the scalar is the plain average of the losses: micro-batches accumulated along the
    #: instances then weigh their gradients by their share of the losses (the whole batch's mean).
    averages_losses: ClassVar[bool] = False

    def __call__(self, values: Tensor, /) -> Tensor:
        check_tensor(values, "The losses given to a scalarizer")
        if values.numel() == 0:
            raise ValueError(
                f"{self!r} got an empty tensor of losses (shape {tuple(values.shape)}); pass at "
                "least one loss."
            )
        check_finite(values, f"The losses given to {self!r}")
        result: Tensor = super().__call__(values)
        if result.ndim != 0:
            raise RuntimeError(
                f"{self!r} returned a tensor of shape {tuple(result.shape)}; expected a scalar."
            )
        check_finite(result, f"The scalarization computed by {self!r}")
        return result

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """Returns the scalar loss of validated, finite, non-empty ``values``."""

    def __str__(self) -> str:
        return type(self).__name__


def as_shape(shape: int | Sequence[int], name: str = "shape") -> tuple[int, ...]:
    """Turns ``n`` into ``(n,)`` and checks that every dimension is a positive int."""
    dims = (
        (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, Sequence) else ()
    )
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(
            f"{name} must be a positive int or a non-empty sequence of positive ints (the shape of "
            f"the losses), got {shape!r}."
        )
    return dims


def check_value_shape(values: Tensor, expected: tuple[int, ...], what: str) -> None:
    """Raises ``ValueError`` if the losses' shape differs from the shape ``what`` was built for."""
    if tuple(values.shape) != expected:
        raise ValueError(
            f"The losses have shape {tuple(values.shape)} but {what} has shape {list(expected)}; "
            "give one entry per loss."
        )


def check_loss_like(tensor: object, name: str) -> Tensor:
    """Validates a per-loss constructor tensor (weights, reference point): float, non-empty, finite."""
    checked = check_tensor(tensor, name)
    if checked.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(checked.shape)}.")
    check_finite(checked, name)
    return checked.detach().clone()


def check_number(value: object, name: str, *, positive: bool) -> float:
    """Checks a finite real hyperparameter that is > 0 (``positive``) or >= 0, and returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}.")
    if value < 0 or (positive and value == 0):
        bound = "strictly positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return float(value)


def numbers_table(**positive_by_name: bool) -> Mapping[str, Callable[[object], float]]:
    """A ``hyper_parameters`` table of real hyper-parameters checked by :func:`check_number`
    (``True``: strictly positive, ``False``: non-negative) on every assignment."""

    def validator(name: str, strictly: bool) -> Callable[[object], float]:
        return lambda value: check_number(value, name, positive=strictly)

    return MappingProxyType({n: validator(n, p) for n, p in positive_by_name.items()})


class PreferenceScalarizer(Scalarizer):
    """A scalarizer parametrised by per-loss constants: ``weights`` and, optionally, ``reference``.

    Both are validated when set (also when reassigned between calls, as COSMOS and PBI do with a
    freshly sampled preference), stored as non-persistent buffers so ``.to()`` moves them, and cast
    to the losses' dtype and device at call time. Their shape must equal the losses' shape.
    """

    #: ``True`` when the weights are a preference: non-negative with at least one positive entry.
    weights_are_preference: ClassVar[bool] = True
    _weights: Tensor | None
    _reference: Tensor | None

    def __init__(self, weights: Tensor | None, reference: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("_weights", None, persistent=False)
        self.register_buffer("_reference", None, persistent=False)
        self.weights = weights
        self.reference = reference

    @property
    def weights(self) -> Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: Tensor | None) -> None:
        if value is None:
            self._weights = None
            return
        weights = check_loss_like(value, "weights")
        if self.weights_are_preference and (
            bool((weights < 0).any()) or not bool((weights > 0).any())
        ):
            raise ValueError(
                f"The weights of {type(self).__name__} are a preference: they must be "
                "non-negative with at least one positive entry."
            )
        self._weights = weights

    @property
    def reference(self) -> Tensor | None:
        return self._reference

    @reference.setter
    def reference(self, value: Tensor | None) -> None:
        self._reference = None if value is None else check_loss_like(value, "reference")

    def _matched(self, tensor: Tensor, values: Tensor, name: str) -> Tensor:
        check_value_shape(values, tuple(tensor.shape), name)
        return tensor.to(dtype=values.dtype, device=values.device)

    def _shifted(self, values: Tensor) -> Tensor:
        """``values - reference`` (``values`` when there is no reference point)."""
        if self._reference is None:
            return values
        return values - self._matched(self._reference, values, "reference")
