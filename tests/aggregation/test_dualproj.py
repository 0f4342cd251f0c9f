"""DualProj against its definition: the preferred combination projected onto the dual cone."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from hypothesis import given, settings
from torch import Tensor

from benchmarks.count_ops import drifting_gramians
from jdoptim.aggregation import DualProj, DualProjWeighting
from tests.aggregation._jacobians import gramian, jacobians, non_conflicting_jacobians
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def test_hand_computed() -> None:
    # g1 = (1, 0), g2 = (-2, 1): the mean (-1/2, 1/2) projects onto {x1 >= 0, x2 >= 2 x1} at (0, 1/2).
    matrix = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    result = DualProj(reg_eps=0.0)(matrix)
    assert torch.allclose(result, torch.tensor([0.0, 0.5], dtype=torch.float64), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_never_conflicts_with_a_row(matrix: Tensor) -> None:
    aggregator = DualProj()
    weights = aggregator.compute_weights(matrix)
    trace = float(gramian(matrix).trace())
    tolerance = 2e-4 * trace * float(weights.abs().max()) + 1e-9 * trace
    assert (matrix @ aggregator(matrix) >= -tolerance).all()


@settings(max_examples=30, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_is_the_closest_point_of_the_cone_among_feasible_weights(matrix: Tensor) -> None:
    """Optimality: w ≥ pref and no feasible perturbation lowers wᵀGw (checked on random ones)."""
    matrix_gramian = gramian(matrix)
    weights = DualProjWeighting(reg_eps=0.0)(matrix_gramian)
    pref = torch.full_like(weights, 1 / weights.shape[0])
    assert (weights >= pref).all()
    objective = weights @ matrix_gramian @ weights
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = weights + torch.rand(weights.shape, generator=generator, dtype=torch.float64)
        other = torch.maximum(other - 0.5, pref)
        assert other @ matrix_gramian @ other >= objective - 1e-7 * float(matrix_gramian.trace())


@settings(max_examples=30, deadline=None)
@given(matrix=non_conflicting_jacobians())
def test_equals_the_mean_when_no_rows_conflict(matrix: Tensor) -> None:
    assert torch.allclose(DualProj()(matrix), matrix.mean(dim=0), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_matches_the_peer(matrix: Tensor) -> None:
    # The peer adds its regularisation to G itself, ours to G / trace(G): equal when trace(G) = 1.
    matrix = matrix / matrix.norm()
    ours, theirs = DualProj()(matrix), peer.DualProj()(matrix)
    assert torch.allclose(ours, theirs, atol=1e-7 * float(theirs.norm()) + 1e-12)


def test_wrong_preference_length() -> None:
    with pytest.raises(ValueError, match="1 entries but there are 2 objectives"):
        DualProj(torch.ones(1))(torch.ones(2, 4))


def test_bad_reg_eps() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        DualProjWeighting(reg_eps=-0.1)


def test_repr() -> None:
    assert repr(DualProj()) == "DualProj(pref_vector=None, reg_eps=0.0001, solver='auto')"
    assert str(DualProj()) == "DualProj" and str(DualProjWeighting()) == "DualProj"


def test_warm_start_state_round_trips_and_keeps_results() -> None:
    inputs = drifting_gramians("low-rank", 24, 5, dtype=torch.float64)
    assert_resumes_identically(lambda: DualProjWeighting(solver="active_set"), inputs, split=2)
    assert_reset_restarts(DualProjWeighting, inputs)
    assert_state_follows_dtype(DualProjWeighting, inputs)
    warm = DualProjWeighting(solver="active_set")
    for gramian_t in inputs:
        expected = DualProjWeighting(solver="quadprog")(gramian_t)
        torch.testing.assert_close(warm(gramian_t), expected, rtol=1e-8, atol=0)
    assert warm._state["solutions"].shape == (1, 24)
