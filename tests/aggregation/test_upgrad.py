"""UPGrad against its definition: the sum of the rows' projections onto the dual cone."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from hypothesis import given, settings
from torch import Tensor

from benchmarks.count_ops import MASK_INDEXING, count, drifting_gramians
from jdoptim.aggregation import UPGrad, UPGradWeighting
from tests.aggregation._jacobians import (
    gramian,
    jacobian_from_seed,
    jacobians,
    non_conflicting_jacobians,
)
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def conflict_tolerance(matrix: Tensor, weights: Tensor, reg_eps: float) -> float:
    """How far below zero ``J d`` may go: the regularisation shifts the KKT conditions by
    ``reg_eps * trace(G) * w`` (plus round-off)."""
    trace = float(gramian(matrix).trace())
    return 2 * reg_eps * trace * float(weights.abs().max()) + 1e-9 * trace


def test_hand_computed() -> None:
    # g1 = (1, 0), g2 = (-1, 1). g1/2 projects onto the dual cone {x1 >= 0, x2 >= x1} at
    # (1/4, 1/4), g2/2 at (0, 1/2): the sum is (1/4, 3/4).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    result = UPGrad(reg_eps=0.0)(matrix)
    assert torch.allclose(result, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_never_conflicts_with_a_row(matrix: Tensor) -> None:
    aggregator = UPGrad()
    weights = aggregator.compute_weights(matrix)
    result = aggregator(matrix)
    assert (matrix @ result >= -conflict_tolerance(matrix, weights, 1e-4)).all()


@settings(max_examples=30, deadline=None)
@given(matrix=jacobians(max_rows=6))
def test_without_regularisation_the_projection_is_exact(matrix: Tensor) -> None:
    weights = UPGradWeighting(reg_eps=0.0)(gramian(matrix))
    assert (matrix @ (weights @ matrix) >= -conflict_tolerance(matrix, weights, 0.0) - 1e-7).all()


@settings(max_examples=40, deadline=None)
@given(matrix=non_conflicting_jacobians())
def test_equals_the_mean_when_no_rows_conflict(matrix: Tensor) -> None:
    rows = matrix.shape[0]
    assert torch.allclose(
        UPGradWeighting()(gramian(matrix)), torch.full_like(matrix[:, 0], 1 / rows)
    )
    assert torch.allclose(UPGrad()(matrix), matrix.mean(dim=0), atol=1e-12)


def test_preference_is_followed_without_conflicts() -> None:
    matrix = jacobian_from_seed(5, 3, 4, 3).abs()
    pref = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.allclose(UPGrad(pref)(matrix), pref @ matrix, atol=1e-12)


def test_zero_gramian_gives_the_preference() -> None:
    pref = torch.tensor([0.0, 2.0, 1.0])
    assert torch.equal(UPGradWeighting(pref)(torch.zeros(3, 3)), pref)


@settings(max_examples=30, deadline=None)
@given(matrix=jacobians(max_rows=8))
def test_matches_the_peer(matrix: Tensor) -> None:
    # The peer adds its regularisation to G itself, ours to G / trace(G): equal when trace(G) = 1.
    matrix = matrix / matrix.norm()
    ours, theirs = UPGrad()(matrix), peer.UPGrad()(matrix)
    assert torch.allclose(ours, theirs, atol=1e-7 * float(theirs.norm()) + 1e-12)


def test_matches_the_peer_with_a_preference() -> None:
    matrix = jacobian_from_seed(7, 4, 5, 3)
    matrix = matrix / matrix.norm()
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert torch.allclose(UPGrad(pref)(matrix), peer.UPGrad(pref)(matrix), atol=1e-8)


def test_wrong_preference_length() -> None:
    with pytest.raises(ValueError, match="3 entries but there are 2 objectives"):
        UPGrad(torch.ones(3))(torch.ones(2, 4))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reg_eps"):
        UPGrad(reg_eps=-1.0)
    with pytest.raises(ValueError, match="solver"):
        UPGrad(solver="nope")(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))  # type: ignore[arg-type]


def test_repr() -> None:
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, reg_eps=0.0001, solver='auto')"
    assert repr(UPGradWeighting(torch.tensor([1.0, 2.0]), reg_eps=0.0)) == (
        "UPGradWeighting(pref_vector=tensor([1.0, 2.0]), reg_eps=0.0, solver='auto')"
    )
    assert str(UPGrad()) == "UPGrad" and str(UPGradWeighting()) == "UPGrad"


def test_setting_pref_vector_on_the_aggregator_reaches_the_weighting_and_is_validated() -> None:
    matrix = torch.tensor([[1.0, 0.0], [-0.5, 1.0], [0.2, 0.3]], dtype=torch.float64)
    aggregator = UPGrad()
    preference = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    aggregator.pref_vector = preference
    assert torch.equal(aggregator.weighting.pref_vector, preference)  # type: ignore[arg-type]
    torch.testing.assert_close(aggregator(matrix), UPGrad(pref_vector=preference)(matrix))
    with pytest.raises(ValueError, match="non-negative"):
        aggregator.pref_vector = torch.tensor([-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="reg_eps must be non-negative"):
        aggregator.reg_eps = -1e-3
    with pytest.raises(ValueError, match="solver must be one of"):
        aggregator.solver = "cvxpy"
    assert torch.equal(aggregator.pref_vector, preference)


def drifting(size: int, steps: int) -> list[Tensor]:
    return drifting_gramians("random", size, steps, dtype=torch.float64)


def test_checkpoint_resumes_bit_identically_and_reset_restarts() -> None:
    inputs = drifting(12, 5)
    assert_resumes_identically(lambda: UPGradWeighting(solver="active_set"), inputs, split=2)
    assert_reset_restarts(lambda: UPGradWeighting(solver="active_set"), inputs)
    assert_state_follows_dtype(UPGradWeighting, inputs)


@pytest.mark.parametrize("solver", ["auto", "active_set", "batched"])
def test_warm_start_keeps_the_result_of_a_cold_start(solver: str) -> None:
    warm = UPGradWeighting(solver=solver)  # type: ignore[arg-type]
    for gramian_t in drifting(40, 4):
        cold = UPGradWeighting(solver="quadprog")(gramian_t)
        torch.testing.assert_close(warm(gramian_t), cold, rtol=1e-8, atol=0)
    assert warm._state["solutions"].shape == (40, 40)


def test_state_is_replaced_when_the_number_of_objectives_changes() -> None:
    weighting = UPGradWeighting(solver="active_set")
    weighting(drifting(6, 1)[0])
    result = weighting(drifting(9, 1)[0])
    assert weighting._state["solutions"].shape == (9, 9)
    torch.testing.assert_close(result, UPGradWeighting(solver="quadprog")(drifting(9, 1)[0]))


@pytest.mark.parametrize("kind", ["random", "low-rank", "near-duplicate"])
@pytest.mark.parametrize("size", [2, 16, 64])
def test_active_set_solver_operation_counts(kind: str, size: int) -> None:
    """At most 300 aten ops and 3 host syncs per call, cold: one for the solver's KKT check, one for
    the weighting's input checks (all read together) and one for its output check; fewer ops from a
    warm start on a drifting sequence."""
    weighting = UPGradWeighting(solver="active_set")
    first, *following = drifting_gramians(kind, size, 3)
    cold = count(weighting, first)
    assert cold.operations <= 300
    assert cold.syncs <= 3
    assert count(UPGradWeighting(solver="active_set").forward, first).syncs == 1
    for gramian_t in following:
        warm = count(weighting, gramian_t)
        assert warm.operations < cold.operations and warm.syncs <= cold.syncs


def test_boolean_mask_indexing_counts_as_a_sync() -> None:
    """``t[mask]`` and ``t[mask] = v`` run a ``nonzero`` inside the indexing kernel (the host must
    learn the size), which a dispatch mode does not see: the counter counts them itself."""
    values, mask = torch.arange(6.0), torch.tensor([True, False] * 3)

    def by_mask() -> None:
        values[mask] = values[mask] + 1

    assert count(by_mask).syncs == 2
    assert count(lambda: values[mask.nonzero().flatten()]).syncs == 1


@pytest.mark.parametrize("kind", ["random", "low-rank", "near-duplicate"])
def test_batched_solver_never_indexes_by_a_mask(kind: str) -> None:
    """Rows leave the batched solver, and its conjugate gradient, at different rounds: they are
    dropped through indices built from a count the host already read, never through boolean
    masks (a hidden host synchronisation each; there were 13 to 200 per call)."""
    for size in (40, 128):
        counter = count(UPGradWeighting(solver="batched"), drifting_gramians(kind, size, 1)[0])
        assert counter.counts[MASK_INDEXING] == 0


def test_checkpoint_without_state_loads_as_a_cold_start() -> None:
    """Checkpoints saved before the weighting kept a warm start have no ``_extra_state``."""
    for weighting in (UPGradWeighting(), UPGrad()):
        weighting.load_state_dict({})
    restored = UPGradWeighting()
    restored(drifting(5, 1)[0])
    restored.load_state_dict({})
    assert not restored._state
