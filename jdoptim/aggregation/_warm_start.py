"""State shared by the dual-cone weightings: the last projections, a warm start for the next call."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from jdoptim._stateful import Stateful


class WarmStarted(Stateful):
    """Keeps the last solutions of a dual-cone projection as state.

    The next solve starts from their free sets ``{j : v_j > u_j}`` (the batched solver also from
    their slacks), which consecutive steps on the same objectives change little.

    The state only decides where the next solve starts, never what it accepts, so a checkpoint
    saved before these methods kept state (no ``_extra_state`` entry) loads as a cold start.
    """

    #: The state is only a warm start: dropping it (``reset()``) changes no result. Callers whose
    #: rows are other objectives at every call (per-instance losses) reset it before each call.
    state_is_a_warm_start = True

    def _warm_start(self) -> Tensor | None:
        previous: Tensor | None = self._state.get("solutions")
        return previous

    def _remember(self, solutions: Tensor) -> None:
        self._state["solutions"] = solutions.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.setdefault(prefix + "_extra_state", {})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
