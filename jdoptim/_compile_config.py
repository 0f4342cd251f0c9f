"""The one ``torch.compile`` setting jdoptim's steps need changed: no donated buffers.

AOTAutograd may compile a training graph whose backward frees its saved tensors after one pass
(``torch._functorch.config.donated_buffer``: a memory saving that assumes a single backward).
jdoptim differentiates a forward pass several times (the engine's passes, the exact route's
batched ones), which such a graph refuses, so a compiled model (``torch.compile(model)``) failed
at its first compiled step wherever AOTAutograd chose donation (convolutional models, once shapes
vary). Building an optimizer or an engine turns donation off for the process.
"""

from __future__ import annotations

import importlib


def allow_several_backward_passes() -> None:
    """Sets ``torch._functorch.config.donated_buffer = False`` (where this torch has it)."""
    try:
        config = importlib.import_module("torch._functorch.config")
    except ImportError:  # pragma: no cover - a torch without functorch's config
        return
    if getattr(config, "donated_buffer", False):
        setattr(config, "donated_buffer", False)  # noqa: B010 - not in every torch version
