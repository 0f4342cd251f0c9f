"""IMTL-G against its definition: equal projections on the unit gradients, weights summing to 1."""

from __future__ import annotations

import torch
import torchjd.aggregation as peer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import IMTLG, IMTLGWeighting
from tests.aggregation._jacobians import gramian, jacobian_from_seed


@st.composite
def well_conditioned_jacobians(draw: st.DrawFn) -> Tensor:
    rows = draw(st.integers(1, 5))
    cols = draw(st.integers(rows, 8))
    matrix = jacobian_from_seed(draw(st.integers(0, 2**31 - 1)), rows, cols, rows)
    eigenvalues = torch.linalg.eigvalsh(gramian(matrix))
    assume(bool(eigenvalues[0] > 1e-6 * eigenvalues[-1]))  # well within the pseudo-inverse's cut
    return matrix


def test_hand_computed() -> None:
    # g1 = (1, 0), g2 = (0, 2): d = (a, b) with a = b and d = w1 g1 + w2 g2, w1 + w2 = 1,
    # so w = (2/3, 1/3) and d = (2/3, 2/3).
    matrix = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = IMTLGWeighting()(gramian(matrix))
    assert torch.allclose(weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert torch.allclose(IMTLG()(matrix), torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(matrix=well_conditioned_jacobians())
def test_equal_projections_on_unit_gradients(matrix: Tensor) -> None:
    weights = IMTLGWeighting()(gramian(matrix))
    projections = matrix @ (weights @ matrix) / matrix.norm(dim=1)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(projections, projections[0].expand_as(projections), rtol=1e-5, atol=1e-8)


@settings(max_examples=30, deadline=None)
@given(matrix=well_conditioned_jacobians())
def test_matches_the_peer(matrix: Tensor) -> None:
    ours, theirs = IMTLG()(matrix), peer.IMTLG()(matrix)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-8 * float(theirs.norm()))


def test_zero_rows_get_no_weight() -> None:
    matrix = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = IMTLGWeighting()(gramian(matrix))
    assert torch.allclose(weights, torch.tensor([2 / 3, 0.0, 1 / 3], dtype=torch.float64))


def test_duplicated_rows_share_the_weight_of_one() -> None:
    base = jacobian_from_seed(3, 3, 6, 3)
    with_copy = torch.cat([base, base[1:2]])
    weights = IMTLGWeighting()(gramian(with_copy))
    expected = IMTLGWeighting()(gramian(base))
    assert torch.allclose(weights[1], weights[3])
    assert torch.allclose(weights[[0, 2]], expected[[0, 2]], atol=1e-7)
    assert torch.allclose(weights[1] + weights[3], expected[1], atol=1e-7)


def test_no_impartial_direction_gives_zero_weights() -> None:
    # e1, e2 and -(e1 + e2) positively span the plane: only d = 0 projects equally on all three.
    matrix = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert torch.equal(IMTLGWeighting()(gramian(matrix)), torch.zeros(3))
    assert torch.equal(IMTLGWeighting()(torch.zeros(3, 3)), torch.zeros(3))


def test_float32_rank_deficient_gramian_stays_sensible() -> None:
    base = jacobian_from_seed(4, 2, 5, 2)
    matrix = torch.cat([base, base, base]).float()  # rank 2 with float32 round-off
    weights = IMTLGWeighting()(gramian(matrix))
    assert torch.isclose(weights.sum(), torch.tensor(1.0), atol=1e-5)
    assert weights.abs().max() < 1.0


def test_repr() -> None:
    assert repr(IMTLG()) == "IMTLG()" and str(IMTLGWeighting()) == "IMTLG"


def test_a_short_gradient_counts_as_much_as_a_long_one() -> None:
    """The pseudo-inverse's cutoff on G itself took a gradient 100 times shorter than another for
    round-off and gave it no weight (from 1/54 of the longest in float32, 1/8000 in float64)."""
    for dtype, short in ((torch.float32, 1e-2), (torch.float64, 1e-4)):
        matrix = torch.tensor([[1.0, 0.0, 0.0], [0.0, short, 0.0]], dtype=dtype)
        weights = IMTLGWeighting()(gramian(matrix))
        expected = torch.tensor([short, 1.0], dtype=dtype) / (1 + short)
        assert torch.allclose(weights, expected, rtol=1e-5)


def test_float32_projections_are_equal_across_gradient_scales() -> None:
    torch.manual_seed(0)
    scales = torch.logspace(-3, 0, 6, dtype=torch.float64)
    matrix = torch.randn(6, 40, dtype=torch.float64) * scales[:, None]
    direction = IMTLG()(matrix.float()).double()
    projections = (matrix / matrix.norm(dim=1, keepdim=True)) @ direction
    assert torch.allclose(projections, projections.mean().expand(6), rtol=1e-3)
    assert torch.allclose(direction, IMTLG()(matrix), rtol=1e-3, atol=1e-6)
