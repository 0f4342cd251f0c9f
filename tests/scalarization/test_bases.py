import pytest
import torch
from torch import Tensor

from jdoptim.scalarization import COSMOS, PBI, STCH, Constant, Mean, Scalarizer, Sum
from jdoptim.scalarization._bases import as_shape, check_number


class _ReturnsVector(Scalarizer):
    def forward(self, values: Tensor, /) -> Tensor:
        return values * 2


class _ReturnsInf(Scalarizer):
    def forward(self, values: Tensor, /) -> Tensor:
        return values.sum() / 0.0


@pytest.mark.parametrize("scalarizer", [Mean(), Sum(), STCH(0.5)])
def test_rejects_non_tensors_and_integer_losses(scalarizer: Scalarizer) -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        scalarizer([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        scalarizer(torch.tensor([1, 2]))


@pytest.mark.parametrize("scalarizer", [Mean(), Sum(), STCH(0.5)])
def test_rejects_empty_and_non_finite_losses(scalarizer: Scalarizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        scalarizer(torch.zeros(0, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            scalarizer(torch.tensor([1.0, bad]))


def test_checks_the_result_is_one_finite_scalar() -> None:
    with pytest.raises(RuntimeError, match="expected a scalar"):
        _ReturnsVector()(torch.ones(3))
    with pytest.raises(ValueError, match="scalarization computed by _ReturnsInf"):
        _ReturnsInf()(torch.ones(3))


def test_accepts_any_shape_including_a_single_loss() -> None:
    assert Sum()(torch.tensor(3.0)).item() == 3.0
    assert Mean()(torch.arange(6.0).reshape(2, 3)).item() == 2.5


def test_repr_shows_the_constructor_and_str_the_name() -> None:
    stch = STCH(0.5, weights=torch.tensor([0.25, 0.75]))
    assert repr(stch) == "STCH(mu=0.5, weights=tensor([0.25, 0.75]), reference=None)"
    assert str(stch) == "STCH"
    assert repr(Mean()) == "Mean()"
    assert repr(Constant(torch.tensor([[1.0, 2.0]]))) == "Constant(weights=tensor([[1.0, 2.0]]))"


def test_as_shape_and_check_number_reject_bad_hyperparameters() -> None:
    assert as_shape(3) == (3,)
    assert as_shape([2, 3]) == (2, 3)
    for bad in (0, -1, [], [2, 0], 2.0, True):
        with pytest.raises(ValueError, match="shape"):
            as_shape(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="finite real number"):
        check_number(float("nan"), "mu", positive=True)
    with pytest.raises(TypeError, match="finite real number"):
        check_number("1", "mu", positive=True)
    with pytest.raises(ValueError, match="strictly positive"):
        check_number(0.0, "mu", positive=True)
    with pytest.raises(ValueError, match="non-negative"):
        check_number(-1.0, "theta", positive=False)
    assert check_number(0, "theta", positive=False) == 0.0


def test_preference_weights_are_validated_when_set_and_reassigned() -> None:
    with pytest.raises(ValueError, match="non-negative with at least one positive"):
        STCH(1.0, weights=torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="non-negative with at least one positive"):
        PBI(1.0, torch.zeros(2))
    cosmos = COSMOS(0.5, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        cosmos.weights = torch.tensor([1.0, float("nan")])
    with pytest.raises(ValueError, match="must not be empty"):
        cosmos.weights = torch.zeros(0)
    cosmos.weights = torch.tensor([3.0, 4.0])
    assert cosmos.weights is not None
    assert cosmos.weights.tolist() == [3.0, 4.0]
    assert Constant(torch.tensor([-1.0, 2.0]))(torch.ones(2)).item() == 1.0


def test_per_loss_constants_must_match_the_losses_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\) but weights has shape \[2\]"):
        Constant(torch.ones(2))(torch.ones(3))
    with pytest.raises(ValueError, match="reference has shape"):
        STCH(1.0, reference=torch.zeros(2, 1))(torch.ones(2))


def test_per_loss_constants_follow_to_and_the_losses_dtype() -> None:
    constant = Constant(torch.tensor([0.5, 2.0])).to(torch.float64)
    assert constant.weights is not None
    assert constant.weights.dtype == torch.float64
    result = Constant(torch.tensor([0.5, 2.0]))(torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert result.dtype == torch.float64
    assert result.item() == 3.0
