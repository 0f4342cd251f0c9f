"""Warnings that point at the user's line, however deep in jdoptim (or torch) they are raised.

A fixed ``stacklevel`` is right for one call path only: the same check runs under
``Engine.compute_gramian``, an optimizer's ``backward`` or ``step``, or a module hook that torch
calls. The first frame outside jdoptim and torch is the user's.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__name__.split(".")[0]], torch)
    if module.__file__ is not None
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside jdoptim and
    torch."""
    level = 1
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)
