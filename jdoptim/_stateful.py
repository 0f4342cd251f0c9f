"""State that weightings, aggregators and scalarizers carry between calls, as a first-class part.

A stateful method keeps every piece of state in ``self._state`` (a dict of tensors and plain Python
values). This base class makes that state travel with the object: ``state_dict()`` saves it (through
``nn.Module``'s extra-state mechanism, so it also nests inside an optimizer's or model's state),
``load_state_dict()`` restores it into a **fresh** instance, ``.to(device)`` moves it and
``reset()`` clears it.

The saved state names the class that saved it, and loading it into another class raises: the
state of one method is meaningless to another (and would fail later, or silently mislead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

StateValue = Any

#: The key of the saved state that names the class it was saved from.
_METHOD_KEY = "__method__"


class Stateful(nn.Module):
    """Mixin base for modules whose output depends on previous calls."""

    def __init__(self) -> None:
        super().__init__()
        self._state: dict[str, StateValue] = {}

    def reset(self) -> None:
        """Forgets everything learnt from previous calls; the next call starts afresh."""
        self._state = {}

    def get_extra_state(self) -> dict[str, StateValue]:
        saved = {
            k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in self._state.items()
        }
        saved[_METHOD_KEY] = type(self).__name__
        return saved

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise TypeError(
                f"The saved state of {type(self).__name__} must be a dict, got {type(state).__name__}."
            )
        state = dict(state)
        saved_by = state.pop(_METHOD_KEY, None)
        if saved_by is not None and saved_by != type(self).__name__:
            raise ValueError(
                f"This state was saved by {saved_by} and cannot be loaded into "
                f"{type(self).__name__}: each method's state only means something to that method. "
                f"Load it into a {saved_by}, or start this {type(self).__name__} afresh."
            )
        device = self._state_device()
        self._state = {
            k: (v.detach().clone().to(device) if device is not None else v.detach().clone())
            if isinstance(v, Tensor)
            else v
            for k, v in state.items()
        }

    def _state_device(self) -> Any:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Stateful:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._state = {k: fn(v) if isinstance(v, Tensor) else v for k, v in self._state.items()}
        return self
