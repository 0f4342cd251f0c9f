"""The fixed-budget active-set dual-cone solver: KKT, agreement with quadprog, warm starts, counts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from benchmarks.count_ops import count, make_gramian
from benchmarks.sweep_dual_cone import kkt_violation, sweep_case
from jdoptim.linalg import DualConeConvergenceError, prepare_dual_cone_gramian, project_to_dual_cone
from jdoptim.linalg._dual_cone_active_set import solve_dual_cone_active_set
from jdoptim.linalg._gramian import normalize_gramian, regularize_gramian
from tests.linalg.test_dual_cone_batched import (
    assert_kkt,
    gramian_with_condition,
    random_gramian,
    rank_deficient_gramian,
)

# Well-conditioned float64 problems: the weights must match quadprog's to this (relative).
AGREEMENT = 1e-8


def assert_matches_quadprog(
    gramian: Tensor, bounds: Tensor, tolerance: float = AGREEMENT
) -> Tensor:
    solution = project_to_dual_cone(gramian, bounds, solver="active_set")
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    error = (solution - reference).abs().max() / reference.abs().max().clamp(min=1e-300)
    assert float(error) <= tolerance
    assert_kkt(gramian, bounds, solution)
    return solution


@pytest.mark.parametrize("size", [1, 2, 5, 16, 40, 90])
def test_random_gramians_upgrad_rows(size: int) -> None:
    assert_matches_quadprog(random_gramian(size, 2 * size + 3, seed=size), torch.eye(size).double())


@pytest.mark.parametrize("kind", ["random", "low-rank", "near-duplicate"])
@pytest.mark.parametrize("size", [8, 33, 64])
def test_benchmark_gramians(kind: str, size: int) -> None:
    gramian = make_gramian(kind, size, dtype=torch.float64)
    assert_matches_quadprog(gramian, torch.eye(size, dtype=torch.float64) / size)


def test_general_lower_bounds_and_rank_deficiency() -> None:
    generator = torch.Generator().manual_seed(0)
    bounds = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    assert_matches_quadprog(rank_deficient_gramian(30, rank=4, seed=1), bounds)


def test_condition_number_1e12() -> None:
    gramian = gramian_with_condition(40, 1e12, seed=3)
    bounds = torch.eye(40, dtype=torch.float64) * torch.linspace(0.5, 2.0, 40).double()
    # cond(G / trace + 1e-4 I) is about 1e4 here: agreement is limited by quadprog's own accuracy.
    assert_matches_quadprog(gramian, bounds, tolerance=1e-6)


def test_duplicated_and_opposite_rows() -> None:
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(10, 30, generator=generator, dtype=torch.float64)
    jacobian = torch.cat([jacobian, jacobian[:4], -jacobian[:2]])
    assert_matches_quadprog(jacobian @ jacobian.T, torch.eye(16, dtype=torch.float64))


def test_non_conflicting_rows_are_returned_unchanged_and_zero_gramian() -> None:
    jacobian = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)).double() + 0.1
    bounds = torch.eye(6, dtype=torch.float64) / 6
    assert torch.equal(
        project_to_dual_cone(jacobian @ jacobian.T, bounds, solver="active_set"), bounds
    )
    mixed = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    zero = project_to_dual_cone(torch.zeros(3, 3).double(), mixed, solver="active_set")
    torch.testing.assert_close(zero, mixed.clamp(min=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "low-rank", "near-duplicate"])
def test_warm_start_from_the_solution_gives_the_same_bits(kind: str) -> None:
    """The accepted solution is the last round's solve on the identified free sets, so starting
    from those sets changes the work done, not one bit of the result."""
    gramian = make_gramian(kind, 48, dtype=torch.float64)
    bounds = torch.eye(48, dtype=torch.float64) / 48
    cold = project_to_dual_cone(gramian, bounds, solver="active_set")
    warm = project_to_dual_cone(gramian, bounds, solver="active_set", warm_start=cold)
    assert torch.equal(warm, cold)


def test_a_wrong_warm_start_still_converges() -> None:
    gramian = random_gramian(30, 40, seed=8)
    bounds = torch.eye(30, dtype=torch.float64)
    everything_free = bounds + 1.0
    solution = project_to_dual_cone(
        gramian, bounds, solver="active_set", warm_start=everything_free
    )
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    torch.testing.assert_close(solution, reference, rtol=AGREEMENT, atol=1e-12)


def test_warm_start_of_another_shape_is_ignored_by_project_and_rejected_below() -> None:
    gramian = random_gramian(5, 8, seed=1)
    bounds = torch.eye(5, dtype=torch.float64)
    stale = torch.ones(4, 4, dtype=torch.float64)
    expected = project_to_dual_cone(gramian, bounds, solver="active_set")
    assert torch.equal(
        project_to_dual_cone(gramian, bounds, solver="active_set", warm_start=stale), expected
    )
    with pytest.raises(ValueError, match="warm_start must have the shape"):
        solve_dual_cone_active_set(
            prepare_dual_cone_gramian(gramian, 1e-4), bounds, warm_start=stale
        )


def test_budget_exhaustion_raises_and_auto_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jdoptim.linalg._dual_cone_active_set.COLD_ROUNDS", 1)
    gramian = random_gramian(30, 31, seed=6)
    bounds = torch.eye(30, dtype=torch.float64)
    with pytest.raises(DualConeConvergenceError, match="did not converge") as caught:
        project_to_dual_cone(gramian, bounds, solver="active_set")
    assert caught.value.rows.numel() > 0
    # "auto" sends rows a torch solver could not finish to the pivoting solver.
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    monkeypatch.setattr(
        "jdoptim.linalg._dual_cone.choose_dual_cone_solver", lambda *a: "active_set"
    )
    solution = project_to_dual_cone(gramian, bounds, solver="auto")
    torch.testing.assert_close(solution, reference, rtol=AGREEMENT, atol=1e-12)


def test_float32_input_is_solved_in_float64() -> None:
    gramian = random_gramian(20, 40, seed=11).float()
    solution = project_to_dual_cone(gramian, torch.eye(20), solver="active_set")
    reference = project_to_dual_cone(gramian, torch.eye(20), solver="quadprog")
    assert solution.dtype == torch.float32
    torch.testing.assert_close(solution, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "gramian",
    [
        random_gramian(7, 9, seed=0),
        random_gramian(7, 9, seed=0).float() * 1e30,
        random_gramian(7, 9, seed=0).float() * 1e-30,
        torch.zeros(4, 4),
    ],
    ids=["float64", "huge", "tiny", "zero"],
)
def test_prepared_gramian_is_bit_identical_to_normalize_then_regularize(gramian: Tensor) -> None:
    symmetric = (gramian + gramian.T) / 2
    expected = regularize_gramian(normalize_gramian(symmetric), 1e-4)
    assert torch.equal(prepare_dual_cone_gramian(gramian, 1e-4), expected)


def test_preparation_and_solve_wait_for_the_device_once() -> None:
    """Host synchronisations (``aten._local_scalar_dense``) of the solver path: one KKT check."""
    gramian = make_gramian("random", 32)
    assert count(prepare_dual_cone_gramian, gramian, 1e-4).syncs == 0
    counter = count(project_to_dual_cone, gramian, torch.eye(32) / 32, solver="active_set")
    assert counter.syncs == 1


@pytest.mark.parametrize("block", range(4))
def test_random_sweep(block: int) -> None:
    """Forty cases of benchmarks/sweep_dual_cone.py (m ≤ 40, reg_eps down to 1e-6, row norms from
    1e-6 to 1e6, opposite and near-duplicate rows, cond(G) = 1e12): never an unconverged row."""
    for index in range(10 * block, 10 * block + 10):
        gramian, bounds, reg_eps = sweep_case(index, max_size=40)
        solution = project_to_dual_cone(gramian, bounds, reg_eps=reg_eps, solver="active_set")
        reference = project_to_dual_cone(gramian, bounds, reg_eps=reg_eps, solver="quadprog")
        assert kkt_violation(gramian, bounds, solution, reg_eps) <= 1e-10
        error = (solution - reference).abs().max() / reference.abs().max()
        assert float(error) <= 1e-7
