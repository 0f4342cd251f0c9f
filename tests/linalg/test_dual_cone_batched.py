"""The batched dual-cone solver against the KKT conditions and against quadprog."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import UPGradWeighting
from jdoptim.linalg import _dual_cone_batched as batched
from jdoptim.linalg import prepare_dual_cone_gramian, project_to_dual_cone
from jdoptim.linalg._dual_cone import choose_dual_cone_solver
from jdoptim.linalg._dual_cone_batched import DualConeConvergenceError, solve_dual_cone_batched

KKT_TOLERANCE = 1e-6
AGREEMENT_TOLERANCE = 1e-5


def random_gramian(size: int, columns: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(size, columns, generator=generator, dtype=torch.float64)
    return jacobian @ jacobian.T


def gramian_with_condition(size: int, condition: float, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), size)
    gramian = (basis * eigenvalues.to(torch.float64)) @ basis.T
    return (gramian + gramian.T) / 2


def rank_deficient_gramian(size: int, rank: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, rank, generator=generator, dtype=torch.float64)
    jacobian = factor @ torch.randn(rank, 3 * size, generator=generator, dtype=torch.float64)
    return jacobian @ jacobian.T


def assert_kkt(gramian: Tensor, bounds: Tensor, solution: Tensor, reg_eps: float = 1e-4) -> None:
    """Checks v ≥ u, μ = G'v ≥ 0 and μ ⊙ (v - u) = 0, relative to the sizes involved."""
    matrix = prepare_dual_cone_gramian(gramian.to(torch.float64), reg_eps)
    solution = solution.to(torch.float64)
    bounds = bounds.to(torch.float64)
    multiplier = solution @ matrix
    size = torch.maximum(
        solution.abs().amax(dim=1, keepdim=True), bounds.abs().amax(dim=1, keepdim=True)
    )
    scale = matrix.abs().max() * size.clamp(min=1e-300)
    slack = solution - bounds
    assert bool((slack >= 0).all())
    assert bool((multiplier >= -KKT_TOLERANCE * scale).all())
    slack_scale = slack.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    assert bool(((multiplier * slack).abs() <= KKT_TOLERANCE * scale * slack_scale).all())


def assert_agrees_with_quadprog(gramian: Tensor, bounds: Tensor) -> Tensor:
    batched = project_to_dual_cone(gramian, bounds, solver="batched")
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    error = (batched - reference).abs().max() / reference.abs().max().clamp(min=1e-300)
    assert float(error) <= AGREEMENT_TOLERANCE
    assert_kkt(gramian, bounds, batched)
    return batched


@pytest.mark.parametrize("size", [1, 2, 7, 40, 90])
def test_random_gramians_upgrad_rows(size: int) -> None:
    gramian = random_gramian(size, 2 * size + 3, seed=size)
    assert_agrees_with_quadprog(gramian, torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("size", [12, 80])
def test_general_lower_bounds(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    bounds = torch.randn(5, size, generator=generator, dtype=torch.float64)
    assert_agrees_with_quadprog(random_gramian(size, size + 1, seed=1), bounds)


@pytest.mark.parametrize("size", [30, 80])
def test_rank_deficient(size: int) -> None:
    gramian = rank_deficient_gramian(size, rank=5, seed=size)
    assert_agrees_with_quadprog(gramian, torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("size", [20, 72])
def test_condition_number_1e12(size: int) -> None:
    gramian = gramian_with_condition(size, 1e12, seed=size)
    bounds = torch.eye(size, dtype=torch.float64) * torch.linspace(0.5, 2.0, size).double()
    assert_agrees_with_quadprog(gramian, bounds)


@pytest.mark.parametrize("base", [10, 40])  # m = 16 (padded systems), 64 (gathered ones)
def test_duplicated_rows(base: int) -> None:
    generator = torch.Generator().manual_seed(3)
    jacobian = torch.randn(base, 3 * base, generator=generator, dtype=torch.float64)
    jacobian = torch.cat([jacobian, jacobian[: 2 * base // 5], -jacobian[: base // 5]])
    size = jacobian.shape[0]
    assert_agrees_with_quadprog(jacobian @ jacobian.T, torch.eye(size, dtype=torch.float64))


def test_zero_gramian_gives_positive_part_of_bounds() -> None:
    bounds = torch.tensor([[1.0, -2.0, 0.5], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    solution = project_to_dual_cone(
        torch.zeros(3, 3, dtype=torch.float64), bounds, solver="batched"
    )
    torch.testing.assert_close(solution, bounds.clamp(min=0), rtol=0, atol=1e-12)


def test_non_conflicting_rows_are_returned_unchanged() -> None:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.rand(6, 10, generator=generator, dtype=torch.float64) + 0.1  # no conflict
    bounds = torch.eye(6, dtype=torch.float64) / 6
    solution = project_to_dual_cone(jacobian @ jacobian.T, bounds, solver="batched")
    assert torch.equal(solution, bounds)


def test_positive_homogeneity() -> None:
    gramian = random_gramian(70, 100, seed=5)
    bounds = torch.eye(70, dtype=torch.float64)
    scales = torch.logspace(-3, 3, 70, dtype=torch.float64)[:, None]
    unit = project_to_dual_cone(gramian, bounds, solver="batched")
    scaled = project_to_dual_cone(gramian, bounds * scales, solver="batched")
    torch.testing.assert_close(scaled, unit * scales, rtol=1e-7, atol=0)


@pytest.mark.parametrize("size", [10, 70])
def test_float32_input_is_solved_in_float64(size: int) -> None:
    gramian = random_gramian(size, 2 * size, seed=11)
    bounds = torch.eye(size, dtype=torch.float64)
    solution = project_to_dual_cone(gramian.float(), bounds.float(), solver="batched")
    assert solution.dtype == torch.float32
    reference = project_to_dual_cone(gramian.float().double(), bounds, solver="quadprog")
    error = (solution.double() - reference).abs().max() / reference.abs().max()
    assert float(error) <= AGREEMENT_TOLERANCE


@pytest.mark.parametrize("size", [20, 90])
def test_iteration_bound_raises(size: int) -> None:
    matrix = prepare_dual_cone_gramian(random_gramian(size, size + 1, seed=2), 1e-4)
    with pytest.raises(RuntimeError, match="did not converge in 1 rounds"):
        solve_dual_cone_batched(matrix, torch.eye(size, dtype=torch.float64), max_rounds=1)


def test_auto_dispatch() -> None:
    small, large = torch.eye(8), torch.eye(200)
    assert choose_dual_cone_solver(small, 1e-4, "auto") == "quadprog"
    assert choose_dual_cone_solver(torch.eye(24), 1e-4, "auto") == "quadprog"
    assert choose_dual_cone_solver(torch.eye(25), 1e-4, "auto") == "batched"
    assert choose_dual_cone_solver(large, 1e-4, "auto") == "batched"
    assert choose_dual_cone_solver(large, 0.0, "auto") == "quadprog"
    assert choose_dual_cone_solver(torch.empty(32, 32, device="meta"), 1e-4, "auto") == "quadprog"
    on_accelerator = torch.empty(200, 200, device="meta")
    assert choose_dual_cone_solver(on_accelerator, 1e-4, "auto") == "active_set"
    assert choose_dual_cone_solver(torch.empty(600, 600, device="meta"), 1e-4, "auto") == "batched"
    assert choose_dual_cone_solver(on_accelerator, 0.0, "auto") == "quadprog"
    assert choose_dual_cone_solver(large, 1e-4, "quadprog") == "quadprog"
    assert choose_dual_cone_solver(small, 1e-4, "batched") == "batched"


@pytest.mark.parametrize("size", [15, 70])
def test_single_exchanges_alone_converge(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # No full exchanges at all: only the fallback rule (Murty's), which must still be exact.
    monkeypatch.setattr("jdoptim.linalg._dual_cone_batched._BACKUP_EXCHANGES", -1)
    generator = torch.Generator().manual_seed(size)
    bounds = torch.randn(4, size, generator=generator, dtype=torch.float64)
    gramian = random_gramian(size, 2 * size, seed=size)
    matrix = prepare_dual_cone_gramian(gramian, 1e-4)
    solution = solve_dual_cone_batched(matrix, bounds, max_rounds=20 * size)
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    torch.testing.assert_close(solution, reference, rtol=AGREEMENT_TOLERANCE, atol=1e-12)
    assert_kkt(gramian, bounds, solution)


def test_auto_finishes_unconverged_rows_with_quadprog(monkeypatch: pytest.MonkeyPatch) -> None:
    def one_round(matrix: Tensor, bounds: Tensor, warm_start: Tensor | None) -> Tensor:
        return solve_dual_cone_batched(matrix, bounds, max_rounds=1, warm_start=warm_start)

    monkeypatch.setattr("jdoptim.linalg._dual_cone.solve_dual_cone_batched", one_round)
    gramian = random_gramian(80, 81, seed=6)
    # Rows that need no projection (zero bounds) are done at once; the others need more rounds.
    bounds = torch.cat(
        [torch.eye(80, dtype=torch.float64), torch.zeros(5, 80, dtype=torch.float64)]
    )
    with pytest.raises(DualConeConvergenceError) as caught:
        project_to_dual_cone(gramian, bounds, solver="batched")
    assert caught.value.rows.tolist() == list(range(80))
    solution = project_to_dual_cone(gramian, bounds, solver="auto")
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    torch.testing.assert_close(solution, reference, rtol=AGREEMENT_TOLERANCE, atol=1e-12)


def test_singular_gramian_without_regularisation_stops_with_a_clear_error() -> None:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    matrix = prepare_dual_cone_gramian(jacobian @ jacobian.T, 0.0)
    with pytest.raises(RuntimeError, match="raise reg_eps, or use solver='quadprog'"):
        solve_dual_cone_batched(matrix, torch.eye(20, dtype=torch.float64))


def test_no_rows() -> None:
    solution = project_to_dual_cone(torch.eye(3), torch.zeros(0, 3), solver="batched")
    assert solution.shape == (0, 3)


def test_unknown_solver_is_rejected() -> None:
    with pytest.raises(ValueError, match="'auto', 'quadprog', 'batched' or 'active_set'"):
        project_to_dual_cone(torch.eye(3), torch.eye(3), solver="cvxpy")  # type: ignore[arg-type]


def test_upgrad_weighting_solvers_agree() -> None:
    gramian = random_gramian(50, 80, seed=9)
    batched = UPGradWeighting(solver="batched")(gramian)
    reference = UPGradWeighting(solver="quadprog")(gramian)
    torch.testing.assert_close(batched, reference, rtol=AGREEMENT_TOLERANCE, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    gramian = random_gramian(300, 400, seed=4)
    bounds = torch.eye(300, dtype=torch.float64)
    on_cuda = project_to_dual_cone(gramian.cuda(), bounds.cuda(), solver="auto")
    assert on_cuda.device.type == "cuda"
    reference = project_to_dual_cone(gramian, bounds, solver="batched")
    torch.testing.assert_close(on_cuda.cpu(), reference, rtol=1e-7, atol=1e-12)
    assert_kkt(gramian, bounds, on_cuda.cpu())


@pytest.mark.parametrize("size", [30, 80])
def test_warm_start_from_a_nearby_solution_converges_to_the_same_point(size: int) -> None:
    gramian = rank_deficient_gramian(size, rank=size // 8 + 1, seed=size)
    bounds = torch.eye(size, dtype=torch.float64) / size
    nearby = gramian + 1e-3 * random_gramian(size, size, seed=1)
    guess = project_to_dual_cone(nearby, bounds, solver="batched")
    warm = project_to_dual_cone(gramian, bounds, solver="batched", warm_start=guess)
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    scale = float(reference.abs().max())
    # Rank-deficient (cond about 1e4 after regularisation): the KKT tolerance allows ~1e-7 here.
    torch.testing.assert_close(warm, reference, rtol=0, atol=1e-6 * scale)
    assert_kkt(gramian, bounds, warm)
    # A poor guess (everything free, far too large) must not matter either.
    poor = project_to_dual_cone(gramian, bounds, solver="batched", warm_start=bounds + 10.0)
    torch.testing.assert_close(poor, reference, rtol=0, atol=1e-6 * scale)
    assert_kkt(gramian, bounds, poor)


@pytest.mark.parametrize("check_every", [1, 4])
def test_progress_read_interval_does_not_change_the_accepted_solution(
    check_every: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Accelerators read the conjugate-gradient progress every 4 iterations; test that path here.
    monkeypatch.setattr("jdoptim.linalg._dual_cone_batched._CPU_CHECK_EVERY", check_every)
    gramian = rank_deficient_gramian(90, rank=12, seed=4)
    assert_agrees_with_quadprog(gramian, torch.eye(90, dtype=torch.float64))


def correlated_gramian(size: int, kind: str, seed: int) -> Tensor:
    """Rows sharing a component (few conflicts: few free variables) or with it removed (many)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(size, 3 * size, generator=generator, dtype=torch.float64)
    if kind == "aligned":
        jacobian = noise + 0.2 * torch.randn(1, 3 * size, generator=generator, dtype=torch.float64)
    else:
        jacobian = noise - 0.7 * noise.mean(dim=0, keepdim=True)
    return jacobian @ jacobian.T


@pytest.mark.parametrize(
    ("kind", "direct_max", "route"),
    [
        ("aligned", 48, "_compact_cholesky_solve"),  # few free variables: G_FF factorised
        ("conflicting", 48, "_solve_through_inverse"),  # few active bounds: H_AA factorised
        ("conflicting", 0, "_masked_conjugate_gradient"),  # neither small enough
    ],
)
def test_each_inner_route_is_taken_and_exact(
    kind: str, direct_max: int, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched, "_direct_max_unknowns", lambda size: direct_max)
    calls: list[str] = []
    for name in ("_compact_cholesky_solve", "_solve_through_inverse", "_masked_conjugate_gradient"):
        original = getattr(batched, name)

        def spy(*args: object, _name: str = name, _original: object = original) -> object:
            calls.append(_name)
            return _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(batched, name, spy)
    gramian = correlated_gramian(90, kind, seed=3)
    bounds = torch.eye(90, dtype=torch.float64)
    batched_solution = project_to_dual_cone(gramian, bounds, solver="batched")
    assert route in calls
    if route != "_masked_conjugate_gradient":
        assert "_masked_conjugate_gradient" not in calls
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    # Well-conditioned: the solvers' exactness rule (1e-8 of quadprog) holds.
    scale = float(reference.abs().max())
    torch.testing.assert_close(batched_solution, reference, rtol=0, atol=1e-8 * scale)
    assert_kkt(gramian, bounds, batched_solution)


def test_ill_conditioned_gramians_get_a_preconditioned_conjugate_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rank 12 of 120 (cond about 1e4 after regularisation): plain conjugate gradient needs many
    # iterations per round, so the later rounds precondition with H_FF; the result is as exact.
    monkeypatch.setattr(batched, "_direct_max_unknowns", lambda size: 0)
    preconditioned: list[bool] = []
    original = batched._masked_conjugate_gradient

    def spy(*args: Tensor | int | None) -> tuple[Tensor, int]:
        preconditioned.append(len(args) > 4 and args[4] is not None)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(batched, "_masked_conjugate_gradient", spy)
    gramian = rank_deficient_gramian(120, rank=12, seed=5)
    bounds = torch.eye(120, dtype=torch.float64)
    solution = project_to_dual_cone(gramian, bounds, solver="batched")
    assert not preconditioned[0] and any(preconditioned)
    reference = project_to_dual_cone(gramian, bounds, solver="quadprog")
    scale = float(reference.abs().max())
    torch.testing.assert_close(solution, reference, rtol=0, atol=1e-6 * scale)
    assert_kkt(gramian, bounds, solution)
    # A well-conditioned Gramian never pays for the inverse.
    preconditioned.clear()
    project_to_dual_cone(random_gramian(120, 240, seed=5), bounds, solver="batched")
    assert preconditioned and not any(preconditioned)


def test_direct_routes_grow_with_m_within_their_memory_bound() -> None:
    assert batched._direct_max_unknowns(64) == 48
    assert batched._direct_max_unknowns(128) == 48
    assert batched._direct_max_unknowns(512) == 108
    # The blocks of all rows stay within 2^24 entries: 128 unknowns at m = 1024, 90 at m = 2048.
    assert batched._direct_max_unknowns(1024) == 128
    assert batched._direct_max_unknowns(2048) == 90
    for size in (33, 100, 700, 1500, 4096):
        assert size * batched._direct_max_unknowns(size) ** 2 <= 2**24


@pytest.mark.parametrize(("kind", "size", "seed"), [("aligned", 220, 1), ("conflicting", 200, 3)])
def test_direct_routes_beyond_48_unknowns_are_exact(
    kind: str, size: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From m ≈ 150 the direct routes take more than 48 unknowns (here up to 61 and 58): the KKT
    conditions hold, and the solution is the one of the routes capped at 48 (conjugate gradient
    where they exceed it)."""
    sizes: list[int] = []
    original = batched._compact_cholesky_solve

    def spy(blocks: object, rhs: Tensor, chosen: Tensor, size: int) -> Tensor:
        sizes.append(size)
        return original(blocks, rhs, chosen, size)  # type: ignore[arg-type]

    monkeypatch.setattr(batched, "_compact_cholesky_solve", spy)
    gramian = correlated_gramian(size, kind, seed=seed)
    bounds = torch.eye(size, dtype=torch.float64)
    solution = project_to_dual_cone(gramian, bounds, solver="batched")
    assert_kkt(gramian, bounds, solution)
    assert 48 < max(sizes) <= batched._direct_max_unknowns(size)
    monkeypatch.setattr(batched, "_direct_max_unknowns", lambda size: 48)
    capped = project_to_dual_cone(gramian, bounds, solver="batched")
    error = (solution - capped).abs().max() / capped.abs().max()
    assert float(error) <= AGREEMENT_TOLERANCE
