"""The step record's summary, against values computed by hand from a Jacobian."""

from __future__ import annotations

import torch

from jdoptim.paths import StepRecord


def test_the_summary_follows_the_gramian() -> None:
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.5, 0.5]], dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    record = StepRecord(torch.tensor([1.0, 2.0, 3.0]), weights, _gramian=lambda: gramian)
    assert record.conflicting_pairs == 2  # (0, 1) and (1, 2)
    mean = jacobian.mean(dim=0)
    assert record.increased_by_mean == int(((jacobian @ mean) < 0).sum())
    direction = weights @ jacobian
    expected = float(direction @ mean / (direction.norm() * mean.norm()))
    assert abs(record.cosine_to_mean - expected) < 1e-12
    assert record.summary()["max_loss"] == 3.0


def test_no_gramian_means_no_summary_statistics() -> None:
    record = StepRecord(torch.tensor(1.0))
    assert record.gramian is None and record.conflicting_pairs is None
    assert record.cosine_to_mean is None


def test_the_gramian_is_computed_once_and_only_when_read() -> None:
    calls = []

    def gramian() -> torch.Tensor:
        calls.append(1)
        return torch.eye(2)

    record = StepRecord(torch.ones(2), torch.ones(2) / 2, _gramian=gramian)
    assert not calls
    assert record.conflicting_pairs == 0
    assert record.cosine_to_mean is not None
    assert len(calls) == 1
