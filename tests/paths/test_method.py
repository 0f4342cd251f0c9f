"""Resolving the user's method into one kind of path."""

from __future__ import annotations

import pytest

from jdoptim.aggregation import (
    MeanWeighting,
    SDMGradWeighting,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
)
from jdoptim.paths import PathKind, needs_gramian, resolve_method
from jdoptim.scalarization import GeometricMean


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({}, PathKind.GRAMIAN),
        ({"weighting": UPGradWeighting()}, PathKind.GRAMIAN),
        ({"aggregator": UPGrad()}, PathKind.GRAMIAN),  # its weighting runs on the Gramian
        ({"aggregator": TrimmedMean(1)}, PathKind.JACOBIAN),
        ({"weighting": SDMGradWeighting()}, PathKind.CROSS_GRAMIAN),
        ({"scalarizer": GeometricMean()}, PathKind.SCALARIZER),
    ],
)
def test_each_method_takes_its_path(kwargs: dict, kind: PathKind) -> None:
    options = {"weighting": None, "aggregator": None, "scalarizer": None, **kwargs}
    assert resolve_method(**options).kind is kind


def test_shape_only_weightings_need_no_gramian() -> None:
    assert not needs_gramian(MeanWeighting())
    assert needs_gramian(UPGradWeighting())


def test_two_methods_at_once_are_rejected() -> None:
    with pytest.raises(ValueError, match="at most one"):
        resolve_method(UPGradWeighting(), UPGrad(), None)
