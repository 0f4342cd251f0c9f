import pytest
import torch
import torchjd.scalarization as peer

from jdoptim.scalarization import COSMOS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_by_hand(dtype: torch.dtype) -> None:
    values = torch.tensor([3.0, 4.0], dtype=dtype, requires_grad=True)
    result = COSMOS(1.0, torch.tensor([1.0, 0.0]))(values)
    # rᵀL = 3 and cos(r, L) = 3/5.
    assert result.item() == pytest.approx(2.4)
    result.backward()
    # r - λ (r / (‖r‖‖L‖) - rᵀL L / (‖r‖‖L‖³)) = (1 - 0.128, 0.096).
    assert torch.allclose(values.grad, torch.tensor([0.872, 0.096], dtype=dtype))


def test_zero_lambda_is_the_linear_scalarisation() -> None:
    values = torch.tensor([3.0, 4.0])
    assert COSMOS(0.0, torch.tensor([0.5, 2.0]))(values).item() == 9.5


def test_resampled_preference_is_used_at_the_next_call() -> None:
    cosmos = COSMOS(0.0, torch.tensor([1.0, 0.0]))
    cosmos.weights = torch.tensor([0.0, 1.0])
    assert cosmos(torch.tensor([3.0, 4.0])).item() == 4.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_peer_values_and_gradients(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    for lambda_ in (0.0, 0.5, 8.0):
        weights = torch.distributions.Dirichlet(torch.ones(3, dtype=dtype)).sample()
        values = (torch.rand(3, dtype=dtype) + 0.2).requires_grad_()
        ours = COSMOS(lambda_, weights)(values)
        (grad_ours,) = torch.autograd.grad(ours, values)
        theirs = peer.COSMOS(lambda_, weights)(values)
        (grad_theirs,) = torch.autograd.grad(theirs, values)
        assert torch.allclose(ours, theirs)
        assert torch.allclose(grad_ours, grad_theirs)


def test_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        COSMOS(-0.1, torch.ones(2))
    with pytest.raises(TypeError, match="needs weights"):
        COSMOS(1.0, None)  # type: ignore[arg-type]


def test_all_zero_losses_give_zero_and_a_finite_gradient() -> None:
    losses = torch.zeros(3, requires_grad=True)
    result = COSMOS(0.5, torch.tensor([1.0, 2.0, 3.0]))(losses)
    result.backward()
    assert float(result.detach()) == 0.0
    assert losses.grad is not None and torch.isfinite(losses.grad).all()
