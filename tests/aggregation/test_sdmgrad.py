from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from torch import Tensor

from jdoptim.aggregation import MGDAWeighting, SDMGradWeighting
from tests.aggregation._jacobians import jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def cross_gramians(count: int, rows: int = 3, dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """``J₁ J₂ᵀ`` of two noisy estimates of one Jacobian per call: square, not symmetric."""
    result = []
    for k in range(count):
        base = jacobian_from_seed(k, rows, 6, rank=min(rows, 6), dtype=dtype)
        noise_1 = jacobian_from_seed(100 + k, rows, 6, rank=rows, dtype=dtype)
        noise_2 = jacobian_from_seed(200 + k, rows, 6, rank=rows, dtype=dtype)
        result.append((base + 0.3 * noise_1) @ (base + 0.3 * noise_2).T)
    return result


def test_hand_computed_single_step() -> None:
    # A = diag(1, 4): s = (1 + 2) / 2, so the normalised matrix is diag(4/9, 16/9); from w = (1/2,
    # 1/2) one step of size 0.1 gives (43/90, 37/90), projected onto the simplex: (8/15, 7/15).
    weighting = SDMGradWeighting(lr=0.1, momentum=0.0, n_iter=1, lambda_=0.0)
    weights = weighting(torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(weights, torch.tensor([8 / 15, 7 / 15], dtype=torch.float64))


def test_lambda_mixes_in_the_preference() -> None:
    pref = torch.tensor([0.2, 0.8], dtype=torch.float64)
    matrix = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    inner = SDMGradWeighting(lr=0.1, momentum=0.0, n_iter=1, lambda_=0.0)(matrix)
    # With λ = 1 the inner gradient gains A p̃ = (4/45, 64/45): step to (1/2 - 4/90 - 4/450, ...).
    weights = SDMGradWeighting(lr=0.1, momentum=0.0, n_iter=1, lambda_=1.0, pref_vector=pref)(
        matrix
    )
    shifted = torch.tensor(
        [0.5 - 0.1 * (2 / 9 + 4 / 45), 0.5 - 0.1 * (8 / 9 + 64 / 45)], dtype=torch.float64
    )
    w = shifted + (1 - shifted.sum()) / 2
    torch.testing.assert_close(weights, (w + pref) / 2)
    assert not torch.allclose(weights, inner)


def test_single_objective_gets_weight_one() -> None:
    weighting = SDMGradWeighting()
    for matrix in cross_gramians(3, rows=1):
        torch.testing.assert_close(weighting(matrix), torch.ones(1, dtype=torch.float64))


def test_converges_to_mgda_weights_on_an_exact_gramian() -> None:
    """With λ = 0 and J₁ = J₂, the inner problem is MGDA's min-norm problem on the simplex."""
    jacobian = jacobian_from_seed(7, 3, 5, rank=3)
    gramian = jacobian @ jacobian.T
    weighting = SDMGradWeighting(lr=0.2, momentum=0.5, n_iter=2000, lambda_=0.0)
    torch.testing.assert_close(weighting(gramian), MGDAWeighting()(gramian), atol=1e-6, rtol=0)


def test_large_lambda_tends_to_the_preference() -> None:
    pref = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    weights = SDMGradWeighting(lambda_=1e6, pref_vector=pref)(cross_gramians(1)[0])
    torch.testing.assert_close(weights, pref, atol=1e-5, rtol=0)


def test_weights_ignore_the_scale_of_the_input() -> None:
    matrices = cross_gramians(4)
    reference, scaled = SDMGradWeighting(), SDMGradWeighting()
    for matrix in matrices:
        torch.testing.assert_close(scaled(matrix * 1e6), reference(matrix))


def test_weights_are_convex_and_state_carries_over() -> None:
    weighting = SDMGradWeighting(lr=0.05, n_iter=2)
    matrices = cross_gramians(3)
    first = weighting(matrices[0])
    again = weighting(matrices[0])
    assert not torch.equal(first, again)  # started from the stored weights, not from uniform
    for weights in (first, again):
        assert bool((weights >= 0).all())
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lr": 0.1, "momentum": 0.2, "n_iter": 5, "lambda_": 1.0}],
    ids=["default", "custom"],
)
def test_matches_torchjd(dtype: torch.dtype, kwargs: dict[str, float]) -> None:
    ours, theirs = SDMGradWeighting(**kwargs), peer.SDMGradWeighting(**kwargs)  # type: ignore[arg-type]
    tolerance = 1e-4 if dtype == torch.float32 else 1e-7
    for matrix in cross_gramians(5, rows=4, dtype=dtype):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=tolerance, rtol=0)


def test_matches_torchjd_with_a_preference() -> None:
    pref = torch.tensor([1.0, 2.0, 3.0])
    ours, theirs = (
        SDMGradWeighting(lr=0.5, pref_vector=pref),
        peer.SDMGradWeighting(lr=0.5, pref_vector=pref),
    )
    for matrix in cross_gramians(4):
        torch.testing.assert_close(ours(matrix), theirs(matrix), atol=1e-9, rtol=0)


def test_state_round_trip_reset_and_dtype() -> None:
    matrices = cross_gramians(6)
    assert_resumes_identically(lambda: SDMGradWeighting(lr=0.5), matrices, split=3)
    assert_reset_restarts(lambda: SDMGradWeighting(lr=0.5), matrices)
    assert_state_follows_dtype(lambda: SDMGradWeighting(lr=0.5), matrices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be positive"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"n_iter": 0}, "n_iter must be a positive int"),
        ({"n_iter": 2.5}, "n_iter must be a positive int"),
        ({"lambda_": -0.1}, "lambda_ must be non-negative"),
        ({"pref_vector": torch.tensor([1.0, -1.0])}, "non-negative"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SDMGradWeighting(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    weighting = SDMGradWeighting()
    with pytest.raises(ValueError, match="square"):
        weighting(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        weighting(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        SDMGradWeighting(pref_vector=torch.ones(2))(torch.eye(3))
    weighting(torch.eye(3))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(2))
    weighting.reset()
    assert weighting(torch.eye(2)).shape == (2,)
