"""Validators of hyper-parameters, run on every assignment (in ``__init__`` and afterwards).

A method lists its hyper-parameters in the class attribute ``hyper_parameters`` (name → validator);
assigning one, ``agg.c = 5.0``, runs the validator, which returns the value to store or raises
``ValueError``/``TypeError`` saying what is accepted. An aggregator built around a weighting
forwards reads and writes of the weighting's hyper-parameters to it, so that a change made during
training (a schedule on CAGrad's ``c``, CR-MOGM's ``alpha`` following the learning rate, a new
preference vector) is never silently ignored.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Any

from jdoptim._named import Validator


def _real(name: str, value: object, requirement: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({requirement}), got {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {requirement}, got {value!r}.")
    return number


def _kept(value: Any) -> Any:
    """Python numbers are stored as given (so reprs stay as written); others become floats."""
    return value if isinstance(value, int | float) else float(value)


def real_in(
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Validator:
    """A finite real number in the interval given by ``low`` and ``high`` (``None``: unbounded)."""
    if low == 0 and high is None:
        requirement = "positive" if low_open else "non-negative"
    else:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else f'{low:g}'}, "
        interval += f"{'inf' if high is None else f'{high:g}'}{right}"
        requirement = f"in {interval}"

    def validate(value: object) -> Any:
        number = _real(name, value, requirement)
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            raise ValueError(f"{name} must be {requirement}, got {value!r}.")
        return _kept(value)

    return validate


def non_negative(name: str) -> Validator:
    return real_in(name, 0.0)


def positive(name: str) -> Validator:
    return real_in(name, 0.0, low_open=True)


def unit_interval(name: str, *, high_open: bool = False) -> Validator:
    return real_in(name, 0.0, 1.0, high_open=high_open)


def integer_at_least(name: str, minimum: int) -> Validator:
    def validate(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}.")
        if value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
        return int(value)

    return validate


def one_of(name: str, choices: Collection[str]) -> Validator:
    def validate(value: object) -> object:
        if value not in choices:
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
        return value

    return validate


def boolean(name: str) -> Validator:
    def validate(value: object) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
        return value

    return validate


def optional(validator: Validator) -> Validator:
    """``None``, or a value ``validator`` accepts."""

    def validate(value: object) -> Any:
        return None if value is None else validator(value)

    return validate


def validators(**by_name: Validator) -> Mapping[str, Validator]:
    """The read-only ``hyper_parameters`` table of a class: ``validators(c=non_negative("c"))``."""
    return MappingProxyType(by_name)
