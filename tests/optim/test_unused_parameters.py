"""Parameters the losses do not use keep ``.grad = None`` on every path, as with torch.optim."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDSGD
from jdoptim.aggregation import TrimmedMean, UPGradWeighting


class WithIdleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.idle = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        output: Tensor = self.used(x).squeeze(-1)
        return output


@pytest.mark.parametrize(
    "method",
    [{"aggregator": TrimmedMean(trim_number=1)}, {"weighting": UPGradWeighting(), "batch_dim": 0}],
    ids=["jacobian-path", "gramian-path"],
)
def test_unused_parameters_get_no_grad_and_do_not_move(method: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = WithIdleLayer()
    idle_before = [p.detach().clone() for p in model.idle.parameters()]
    optimizer = JDSGD(model.parameters(), lr=0.1, weight_decay=0.5, momentum=0.9, **method)  # type: ignore[arg-type]
    x, y = torch.randn(5, 3), torch.randn(5)

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses: Tensor = (model(x) - y).square()
        return losses

    for _ in range(2):
        optimizer.step(closure)
    assert all(p.grad is None for p in model.idle.parameters())
    assert all(p.grad is not None for p in model.used.parameters())
    for param, before in zip(model.idle.parameters(), idle_before, strict=True):
        assert torch.equal(param, before)


def test_a_parameter_used_by_one_micro_batch_only_gets_its_gradient() -> None:
    """Backward-then-step with two micro-batches: a parameter one of them reaches gets a .grad;
    one that neither reaches keeps None."""
    torch.manual_seed(0)
    model = WithIdleLayer()
    extra = nn.Linear(3, 1)
    params = [*model.parameters(), *extra.parameters()]
    optimizer = JDSGD(params, lr=0.1, aggregator=TrimmedMean(trim_number=1), batch_dim=0)
    x, y = torch.randn(5, 3), torch.randn(5)
    optimizer.zero_grad()
    optimizer.backward((model(x) - y).square())
    optimizer.backward((model(x) + extra(x).squeeze(-1) - y).square())
    optimizer.step()
    assert all(p.grad is not None for p in extra.parameters())
    assert all(p.grad is None for p in model.idle.parameters())


@pytest.mark.parametrize("form", ["closure", "backward"])
@pytest.mark.parametrize("batch_dim", [0, None])
def test_leaves_the_losses_reach_outside_the_optimizer_are_named_once(
    form: str, batch_dim: int | None
) -> None:
    """A head under another optimizer gets no .grad from a Jacobian-descent step (loss.backward()
    would fill it): a warning says so once, instead of that optimizer never moving it silently."""
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    optimizer = JDSGD(trunk.parameters(), lr=0.1, batch_dim=batch_dim)

    def losses() -> Tensor:
        out = head(torch.tanh(trunk(x))).squeeze(-1) ** 2
        return out if batch_dim is not None else torch.stack([out[:3].mean(), out[3:].mean()])

    def one_step() -> None:
        if form == "closure":
            optimizer.step(losses)
        else:
            optimizer.zero_grad()
            optimizer.backward(losses())
            optimizer.step()

    with pytest.warns(UserWarning, match=r"reach 2 parameter\(s\) that this JDSGD"):
        one_step()
    assert head.weight.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_step()  # once
        head.requires_grad_(False)  # what toggle_optimizer does: no warning for frozen leaves
        fresh = JDSGD(trunk.parameters(), lr=0.1, batch_dim=batch_dim)
        optimizer = fresh
        one_step()


def test_an_input_requiring_grad_is_no_untrained_parameter() -> None:
    """A physics-informed network differentiates its losses with respect to its inputs too:
    they reach x, which requires grad, and no optimizer has to move it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    optimizer = JDSGD(model.parameters(), lr=0.01, batch_dim=0)
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = model(x).squeeze(-1)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        optimizer.backward(du[:, 0] ** 2 + u**2)
        optimizer.step()
