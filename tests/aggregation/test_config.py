"""ConFIG: hand-checked values, equal cosine with every row, the Gramian form against the peer."""

from __future__ import annotations

import math

import pytest
import torch
import torchjd.aggregation as peer

from jdoptim.aggregation import ConFIG, ConFIGWeighting
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]


def cosines(jacobian: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return jacobian @ direction / (jacobian.norm(dim=1) * direction.norm())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_rows_by_hand(dtype: torch.dtype) -> None:
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=dtype)
    # Equal cosines: u = [1, 1]/√2; length = (2 + 1)/√2, so d = 1.5 [1, 1].
    torch.testing.assert_close(ConFIG()(jacobian), torch.tensor([1.5, 1.5], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(2, 3), (4, 9), (6, 6)])
def test_equal_cosine_with_every_row(dtype: torch.dtype, rows: int, cols: int) -> None:
    jacobian = jacobian_from_seed(rows + 10 * cols, rows, cols, rank=rows, dtype=dtype)
    direction = ConFIG()(jacobian)
    cos = cosines(jacobian.double(), direction.double())
    tolerance = 1e-3 if dtype == torch.float32 else 1e-9
    assert (cos > 0).all()
    assert (cos.max() - cos.min()) < tolerance
    # The length is the sum of the rows' projections on the direction.
    unit = direction.double() / direction.double().norm()
    length = (jacobian.double() @ unit).sum()
    assert float(direction.double().norm()) == pytest.approx(float(length), rel=tolerance)


def test_cosines_follow_the_preference() -> None:
    jacobian = jacobian_from_seed(5, 3, 7, rank=3)
    pref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    cos = cosines(jacobian, ConFIG(pref)(jacobian))
    torch.testing.assert_close(cos / cos[0], pref, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "rank"), [(3, 5, 3), (5, 3, 3), (4, 8, 4)])
def test_gramian_form_matches_the_peer(dtype: torch.dtype, rows: int, cols: int, rank: int) -> None:
    """The peer computes pinv of the unit rows; the Gramian form must give the same direction."""
    jacobian = jacobian_from_seed(rows * cols, rows, cols, rank=rank, dtype=dtype)
    for pref_vector in (None, torch.linspace(1.0, 2.0, rows, dtype=dtype)):
        ours = ConFIG(pref_vector)(jacobian)
        theirs = peer.ConFIG(pref_vector)(jacobian)
        tolerance = 1e-4 if dtype == torch.float32 else 1e-10
        assert (ours - theirs).norm() <= tolerance * theirs.norm()


def test_zero_row_gets_no_weight_and_zero_jacobian_gives_zero() -> None:
    jacobian = jacobian_from_seed(9, 3, 5, rank=3)
    jacobian[1] = 0
    weights = ConFIG().compute_weights(jacobian)
    assert weights[1] == 0
    torch.testing.assert_close(ConFIG()(jacobian), peer.ConFIG()(jacobian), rtol=1e-10, atol=0)
    assert torch.equal(ConFIG()(torch.zeros(3, 4)), torch.zeros(4))


def test_weights_are_scale_free() -> None:
    jacobian = jacobian_from_seed(4, 3, 6, rank=3)
    gramian = jacobian @ jacobian.T
    weighting = ConFIGWeighting()
    torch.testing.assert_close(weighting(gramian * 1e-12), weighting(gramian), rtol=1e-9, atol=0)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="pref_vector"):
        ConFIGWeighting(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        ConFIG()(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-dimensional"):
        ConFIG()(torch.ones(3))
    with pytest.raises(ValueError, match="pref_vector has 3 entries"):
        ConFIG(torch.ones(3))(torch.ones(2, 3))
    assert repr(ConFIG()) == "ConFIG(pref_vector=None)"


@pytest.mark.parametrize(("rows", "cols", "rank"), [(3, 5, 3), (5, 3, 3), (6, 9, 4)])
def test_weighting_form_equals_the_jacobian_form(rows: int, cols: int, rank: int) -> None:
    """ConFIGWeighting (from G, for autogram) and ConFIG (SVD of J) compute the same weights."""
    jacobian = jacobian_from_seed(rows + cols + rank, rows, cols, rank=rank)
    pref = torch.linspace(1.0, 3.0, rows, dtype=torch.float64)
    from_gramian = ConFIGWeighting(pref)(jacobian @ jacobian.T) @ jacobian
    from_jacobian = ConFIG(pref)(jacobian)
    torch.testing.assert_close(from_gramian, from_jacobian, rtol=1e-8, atol=1e-10)


def test_no_parameters_give_an_empty_direction() -> None:
    assert ConFIG()(torch.zeros(3, 0)).shape == (0,)


def _at_angles(angles: list[float], norms: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(
        [[n * math.cos(a), n * math.sin(a)] for a, n in zip(angles, norms, strict=True)],
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unit_rows_summing_to_zero_give_the_zero_direction(dtype: torch.dtype) -> None:
    """No direction has equal positive cosines with g and -4g (nor with three rows at 120°): the
    direction is 0. The aggregator rescaled the rounding noise of U⁺p to full length (1.5 for
    [[-0.5], [2]], increasing the first loss)."""
    third = 2 * math.pi / 3
    degenerate = [
        torch.tensor([[-0.5], [2.0]], dtype=dtype),
        torch.tensor([[1.0, 2.0, -1.0], [-4.0, -8.0, 4.0]], dtype=dtype),
    ]
    if dtype == torch.float64:  # in float32 the rounded rows no longer sum to zero exactly
        degenerate.append(_at_angles([0.0, third, 2 * third], [1.0, 2.0, 3.0], dtype))
    for matrix in degenerate:
        assert ConFIG()(matrix).abs().max() == 0
        assert ConFIGWeighting()(matrix @ matrix.T).abs().max() == 0
    # Off the degenerate angle, a direction again, the same by both paths.
    matrix = _at_angles([0.0, third, 2 * third + 0.1], [1.0, 2.0, 3.0], dtype)
    direction = ConFIG()(matrix)
    assert direction.norm() > 0.01
    torch.testing.assert_close(ConFIGWeighting()(matrix @ matrix.T) @ matrix, direction)
