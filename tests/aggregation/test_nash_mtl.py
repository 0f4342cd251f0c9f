"""Nash-MTL: the bargaining condition, clipping, state (reuse, warm start, save/restore, reset)."""

from __future__ import annotations

import math

import pytest
import torch

from jdoptim.aggregation import NashMTL, NashMTLWeighting
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_rows_by_hand(dtype: torch.dtype) -> None:
    jacobian = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=dtype)
    # G = diag(9, 16), so αᵢ = 1/√Gᵢᵢ = 1 / |gᵢ| (the paper's G α = 1/α on G itself).
    expected = torch.tensor([1 / 3, 1 / 4], dtype=dtype)
    torch.testing.assert_close(NashMTL(max_norm=0.0).compute_weights(jacobian), expected)
    # ‖Jᵀα‖ = √2 > 1: clipped to norm 1.
    clipped = NashMTL(max_norm=1.0)(jacobian)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.0], dtype=dtype) / math.sqrt(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(2, 5), (4, 9), (6, 30), (5, 3)])
def test_bargaining_condition(dtype: torch.dtype, rows: int, cols: int) -> None:
    """G α = 1/α on G itself (the paper's condition), solved as Ĝ α̂ = 1/α̂ with
    Ĝ = G / ‖G‖_F + 1e-10 I and α = α̂ / ‖G‖_F^½, to a componentwise backward error of 1e-10."""
    jacobian = jacobian_from_seed(rows + cols, rows, cols, rank=min(rows, cols), dtype=dtype)
    weights = NashMTLWeighting(max_norm=0.0)(jacobian @ jacobian.T)
    assert weights.dtype == dtype and (weights > 0).all()
    gramian = (jacobian @ jacobian.T).double()
    norm = torch.linalg.matrix_norm(gramian)
    normalized = gramian / norm + 1e-10 * torch.eye(rows)
    alpha = weights.double() * norm.sqrt()
    error = (alpha * (normalized @ alpha) - 1).abs()
    scale = alpha * (normalized.abs() @ alpha) + 1
    # float32 weights carry a relative rounding of about 1e-7 each.
    tolerance = 1e-6 if dtype == torch.float32 else 1e-9
    assert (error <= tolerance * scale).all()


def test_the_solution_maximises_the_sum_of_log_improvements() -> None:
    """d = Jᵀα maximises Σ log(gᵢᵀd) over directions of its norm (sampled in the plane)."""
    jacobian = torch.tensor([[1.0, 0.3], [-0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    direction = NashMTL(max_norm=0.0)(jacobian)
    angles = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)
    candidates = direction.norm() * torch.stack([angles.cos(), angles.sin()], dim=1)
    improvements = candidates @ jacobian.T
    feasible = (improvements > 0).all(dim=1)
    utilities = improvements[feasible].log().sum(dim=1)
    assert float((jacobian @ direction).log().sum()) >= float(utilities.max()) - 1e-12


def test_clipping_bounds_the_norm() -> None:
    jacobian = 10 * jacobian_from_seed(1, 3, 6, rank=3)  # unclipped: norm √3 at any scale
    for max_norm in (0.5, 1.5):
        assert float(NashMTL(max_norm=max_norm)(jacobian).norm()) == pytest.approx(max_norm)
    unclipped = NashMTL(max_norm=0.0)(jacobian)
    assert float(NashMTL(max_norm=1e9)(jacobian).norm()) == pytest.approx(float(unclipped.norm()))


def test_update_weights_every_reuses_the_solution() -> None:
    first = jacobian_from_seed(2, 3, 6, rank=3)
    second = jacobian_from_seed(3, 3, 6, rank=3)
    weighting = NashMTLWeighting(max_norm=0.0, update_weights_every=2)
    fresh = NashMTLWeighting(max_norm=0.0)
    weights_1 = weighting(first @ first.T)
    weights_2 = weighting(second @ second.T)  # call 2 of 2: reused
    weights_3 = weighting(second @ second.T)  # call 3: solved again
    torch.testing.assert_close(weights_2, weights_1, rtol=0, atol=0)
    torch.testing.assert_close(weights_3, fresh(second @ second.T), rtol=1e-9, atol=0)


def test_state_round_trip_into_a_fresh_instance_and_reset() -> None:
    matrices = [jacobian_from_seed(seed, 3, 7, rank=3) for seed in range(4)]
    original = NashMTL(update_weights_every=3)
    for matrix in matrices[:2]:
        original(matrix)
    restored = NashMTL(update_weights_every=3)
    restored.load_state_dict(original.state_dict())
    for matrix in matrices[2:]:
        torch.testing.assert_close(restored(matrix), original(matrix), rtol=0, atol=0)
    # A fresh instance solves at its first call and so differs from the restored one here.
    fresh_output = NashMTL(update_weights_every=3)(matrices[3])
    restored.reset()
    torch.testing.assert_close(restored(matrices[3]), fresh_output, rtol=0, atol=0)
    assert restored.weighting._state["calls"] == 1


def test_state_follows_the_dtype_of_to() -> None:
    weighting = NashMTLWeighting()
    jacobian = jacobian_from_seed(5, 3, 4, rank=3)
    weighting(jacobian @ jacobian.T)
    weighting.to(torch.float32)
    assert weighting._state["weights"].dtype == torch.float32
    assert weighting(jacobian.float() @ jacobian.float().T).dtype == torch.float32


def test_zero_and_rank_deficient_jacobians() -> None:
    assert torch.equal(NashMTL()(torch.zeros(3, 4)), torch.zeros(4))
    jacobian = jacobian_from_seed(8, 3, 5, rank=3)
    jacobian[1] = 0  # no bargaining solution without the ridge: the ridge keeps it finite
    result = NashMTL()(jacobian)
    assert torch.isfinite(result).all()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="n_tasks"):
        NashMTLWeighting(n_tasks=0)
    with pytest.raises(ValueError, match="max_norm"):
        NashMTLWeighting(max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        NashMTLWeighting(update_weights_every=0)
    with pytest.raises(ValueError, match="max_iters"):
        NashMTLWeighting(max_iters=0)
    with pytest.raises(ValueError, match="n_tasks=2"):
        NashMTL(n_tasks=2)(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        NashMTLWeighting()(torch.full((2, 2), float("nan")))
    assert str(NashMTLWeighting()) == "NashMTL"


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_unclipped_step_has_norm_root_m_at_any_scale(scale: float) -> None:
    """αᵢ (G α)ᵢ = 1 for every i gives ‖Jᵀα‖² = m whatever the scale of J, so the default
    clipping (max_norm=1) gives a step of length 1, as TorchJD and the authors' code do. Solving
    on G / ‖G‖_F without undoing it gave a step of length √(m ‖G‖_F): 0.11 at scale 0.01."""
    jacobian = scale * jacobian_from_seed(7, 3, 20, rank=3)
    direction = NashMTL(max_norm=0.0)(jacobian)
    assert float(direction.norm()) == pytest.approx(math.sqrt(3), rel=1e-8)
    assert float(NashMTL()(jacobian).norm()) == pytest.approx(1.0, rel=1e-8)
