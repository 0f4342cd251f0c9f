"""The base of every method module: a readable ``repr``/``str`` and validated hyper-parameters.

Shared by weightings, aggregators and scalarizers (it sits below every package).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

#: Takes an assigned value and returns the value to store, or raises saying what is accepted.
Validator = Callable[[Any], Any]


class Named(nn.Module):
    """``repr`` shows the constructor call, ``str`` the short method name.

    Hyper-parameters listed in :attr:`hyper_parameters` are validated on every assignment.
    """

    #: Hyper-parameter name → validator returning the value to store (or raising). Assigning one,
    #: in ``__init__`` or during training, runs its validator.
    hyper_parameters: ClassVar[Mapping[str, Validator]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        validator = type(self).hyper_parameters.get(name)
        if validator is not None:
            value = validator(value)
        super().__setattr__(name, value)

    def _repr_args(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def __str__(self) -> str:
        return type(self).__name__.removesuffix("Weighting")


def tensor_repr(tensor: Tensor | None) -> str:
    """A constructor tensor as the ``tensor(...)`` call that rebuilds it exactly (``from torch
    import tensor``): each entry in the fewest digits that round-trip in its dtype, so that two
    settings never print alike (a ``repr`` names runs)."""
    if tensor is None:
        return "None"
    values = tensor.detach().cpu()
    single = values.dtype == torch.float32

    def nested(entries: object) -> str:
        if isinstance(entries, list):
            return "[" + ", ".join(nested(entry) for entry in entries) + "]"
        value = float(entries)  # type: ignore[arg-type]  # a leaf of tolist()
        return str(np.float32(value)) if single else repr(value)

    suffix = "" if single else f", dtype={values.dtype}"
    return "tensor(" + nested(values.tolist()) + suffix + ")"
