"""The bases: validation, weight checks, hooks, repr, Flattening and the aggregator wrappers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim.aggregation import (
    Aggregator,
    ConstantWeighting,
    Flattening,
    GramianWeightedAggregator,
    IMTLGWeighting,
    MeanWeighting,
    MGDAWeighting,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
)
from tests.aggregation._jacobians import gramian, jacobian_from_seed


class RowSumWeighting(Weighting):
    """A weighting of matrices: the sum of each row."""

    input_kind = "matrix"

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.sum(dim=1)


class WrongShapeWeighting(Weighting):
    def forward(self, gramian: Tensor, /) -> Tensor:
        return gramian.sum(dim=0)[:-1]


class NaNWeighting(Weighting):
    def forward(self, gramian: Tensor, /) -> Tensor:
        return torch.full((gramian.shape[0],), float("nan"), dtype=gramian.dtype)


class WrongShapeAggregator(Aggregator):
    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.sum()


def test_weighted_aggregator_combines_rows_with_matrix_weights() -> None:
    matrix = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    aggregator = WeightedAggregator(RowSumWeighting())
    # weights [3, 2] -> 3 * [1, 2] + 2 * [3, -1]
    assert torch.equal(aggregator(matrix), torch.tensor([9.0, 4.0]))


def test_gramian_weighted_aggregator_uses_the_gramian() -> None:
    matrix = jacobian_from_seed(0, 4, 6, 3)
    aggregator = GramianWeightedAggregator(UPGradWeighting())
    expected = UPGradWeighting()(gramian(matrix))
    assert torch.allclose(aggregator.compute_weights(matrix), expected, atol=1e-12)
    assert torch.allclose(aggregator(matrix), expected @ matrix, atol=1e-12)


def test_weightings_without_values_get_a_placeholder_of_the_right_shape() -> None:
    seen: list[Tensor] = []
    weighting = MeanWeighting()
    weighting.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    GramianWeightedAggregator(weighting)(torch.randn(3, 5))
    assert seen[0].shape == (3, 3)


@pytest.mark.parametrize(
    ("wrapper", "weighting"),
    [(WeightedAggregator, UPGradWeighting()), (GramianWeightedAggregator, RowSumWeighting())],
)
def test_wrappers_reject_the_wrong_input_kind(
    wrapper: type[WeightedAggregator], weighting: Weighting
) -> None:
    with pytest.raises(TypeError, match="wrap it in"):
        wrapper(weighting)


def test_wrappers_reject_non_weightings() -> None:
    with pytest.raises(TypeError, match="must be a Weighting"):
        GramianWeightedAggregator(lambda g: g.sum(0))  # type: ignore[arg-type]


def test_weights_of_the_wrong_shape_are_an_error() -> None:
    with pytest.raises(RuntimeError, match="weights of shape"):
        WrongShapeWeighting()(torch.eye(3))


def test_non_finite_weights_are_an_error() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        NaNWeighting()(torch.eye(3))


def test_aggregation_of_the_wrong_shape_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="expected \\[2\\]"):
        WrongShapeAggregator()(torch.ones(3, 2))


def test_matrix_weightings_accept_non_square_input() -> None:
    assert RowSumWeighting()(torch.ones(2, 5)).tolist() == [5.0, 5.0]


def test_weighting_hooks_change_the_aggregation() -> None:
    weighting = MeanWeighting()
    weighting.register_forward_hook(lambda module, args, output: output * 2)
    matrix = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(GramianWeightedAggregator(weighting)(matrix), torch.tensor([4.0, 6.0]))


def test_weighting_repr_and_str() -> None:
    assert repr(MGDAWeighting()) == "MGDAWeighting(reg_eps=1e-10)"
    assert str(MGDAWeighting()) == "MGDA"
    assert repr(Flattening(MeanWeighting())) == "Flattening(MeanWeighting())"
    assert str(Flattening(MeanWeighting())) == "Flattening(Mean)"


# --- Flattening -------------------------------------------------------------------------------


def generalized_gramian(jacobian: Tensor) -> Tensor:
    """``[m1, ..., mk, mk, ..., m1]`` Gramian of a generalized Jacobian ``[m1, ..., mk, n]``."""
    k = jacobian.ndim - 1
    flat = jacobian.reshape(-1, jacobian.shape[-1])
    shape = tuple(jacobian.shape[:-1])
    full = (flat @ flat.T).reshape(*shape, *shape)
    return full.permute(*range(k), *range(2 * k - 1, k - 1, -1))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    cols=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_flattening_weights_the_flattened_gramian(shape: list[int], cols: int, seed: int) -> None:
    rows = 1
    for size in shape:
        rows *= size
    flat = jacobian_from_seed(seed, rows, cols, min(rows, cols))
    jacobian = flat.reshape(*shape, cols)
    weights = Flattening(UPGradWeighting())(generalized_gramian(jacobian))
    expected = UPGradWeighting()(gramian(flat)).reshape(shape)
    assert weights.shape == tuple(shape)
    assert torch.allclose(weights, expected, atol=1e-10)


def test_flattening_of_a_scalar_gramian() -> None:
    weights = Flattening(MeanWeighting())(torch.tensor(4.0))
    assert weights.shape == () and float(weights) == 1.0


def test_flattening_needs_a_gramian_weighting() -> None:
    with pytest.raises(TypeError, match="Weighting of Gramians"):
        Flattening(RowSumWeighting())
    with pytest.raises(TypeError, match="Weighting of Gramians"):
        Flattening(MeanWeighting)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(2, 2, 2), "even number of dimensions"),
        (torch.ones(2, 3, 2, 3), "second half reversed"),
        (torch.ones(0, 0), "must not be empty"),
        (torch.full((2, 2), float("nan")), "NaN or infinite"),
    ],
    ids=["odd-ndim", "not-reversed", "empty", "nan"],
)
def test_flattening_rejects_bad_generalized_gramians(bad: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Flattening(MeanWeighting())(bad)


def test_constant_weights_follow_the_input_dtype() -> None:
    weights = ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.eye(2, dtype=torch.float64))
    assert weights.dtype == torch.float64


def test_half_precision_jacobians_are_weighed_from_a_float32_gramian() -> None:
    """A float16 J Jᵀ overflows from entries of a few hundred (its largest number is 65504): the
    aggregation of a finite float16 Jacobian raised as for a diverging model."""
    torch.manual_seed(0)
    jacobian = torch.randn(6, 40) * 300
    for dtype in (torch.float16, torch.bfloat16):
        half = jacobian.to(dtype)
        direction = UPGrad()(half)
        assert direction.dtype == dtype and bool(torch.isfinite(direction).all())
        expected = UPGrad()(half.float())
        torch.testing.assert_close(direction.float(), expected, rtol=1e-2, atol=1e-2 * 300)


def test_imtl_g_weighs_half_precision_gramians() -> None:
    torch.manual_seed(0)
    jacobian = torch.randn(4, 10)
    for dtype in (torch.float16, torch.bfloat16):
        weights = IMTLGWeighting()((jacobian @ jacobian.T).to(dtype))
        assert weights.dtype == dtype
        expected = IMTLGWeighting()((jacobian @ jacobian.T).to(dtype).float())
        torch.testing.assert_close(weights.float(), expected, rtol=1e-2, atol=1e-2)
