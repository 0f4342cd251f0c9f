"""The saved state of a method names its class, and another class refuses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import Stateful
from jdoptim.aggregation import (
    GradNorm,
    GradVacWeighting,
    MoDoWeighting,
    NashMTL,
    SDMGradWeighting,
)
from jdoptim.scalarization import FAMO


def _used(method: nn.Module, matrix: torch.Tensor) -> nn.Module:
    method(matrix)
    return method


CROSS = torch.tensor([[2.0, 0.5], [0.3, 1.0]], dtype=torch.float64)
GRAMIAN = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
JACOBIAN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("source", "target", "saved_by"),
    [
        (lambda: _used(SDMGradWeighting(), CROSS), MoDoWeighting, "SDMGradWeighting"),
        (lambda: _used(NashMTL(), JACOBIAN), GradNorm, "NashMTLWeighting"),
        (lambda: _used(GradVacWeighting(), GRAMIAN), lambda: FAMO(2), "GradVacWeighting"),
    ],
    ids=["SDMGrad-into-MoDo", "NashMTL-into-GradNorm", "GradVac-into-FAMO"],
)
def test_another_methods_state_is_refused(source: object, target: object, saved_by: str) -> None:
    state = source().state_dict()  # type: ignore[operator]
    fresh = target()  # type: ignore[operator]
    stateful = [m for m in fresh.modules() if isinstance(m, Stateful)]
    before = [dict(m._state) for m in stateful]
    with pytest.raises(ValueError, match=f"saved by {saved_by} and cannot be loaded into"):
        fresh.load_state_dict(state)
    assert [m._state.keys() for m in stateful] == [b.keys() for b in before]


def test_own_state_round_trips_and_old_checkpoints_without_the_name_still_load() -> None:
    source = _used(MoDoWeighting(), CROSS)
    state = source.state_dict()
    assert state["_extra_state"]["__method__"] == "MoDoWeighting"
    restored = MoDoWeighting()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(CROSS), source(CROSS))
    legacy = {k: v for k, v in state["_extra_state"].items() if k != "__method__"}
    older = MoDoWeighting()
    older.load_state_dict({"_extra_state": legacy})
    assert "__method__" not in older._state
