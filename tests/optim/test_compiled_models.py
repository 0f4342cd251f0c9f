"""An optimizer step on a ``torch.compile``d model: compiled graphs run, and the step is exact.

Graphs are counted with dynamo's counters, never timed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from jdoptim import JDSGD
from tests._marks import COMPILING
from tests.optim._models import assert_same_params

pytestmark = COMPILING


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 1))


@pytest.mark.parametrize("form", ["closure", "backward-then-step"])
def test_a_compiled_model_trains_compiled_and_equals_eager(form: str) -> None:
    eager = _model()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    x, y = torch.randn(3, 6, 5), torch.randn(3, 6)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    reference = JDSGD(eager.parameters(), lr=0.1, batch_dim=0)

    def losses(m: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
        return (m(xs).squeeze(-1) - ys) ** 2

    for xs, ys in zip(x, y, strict=True):
        if form == "closure":
            optimizer.step(lambda xs=xs, ys=ys: losses(compiled, xs, ys))
        else:
            optimizer.backward(losses(compiled, xs, ys))
            optimizer.step()
            optimizer.zero_grad()
        reference.step(lambda xs=xs, ys=ys: losses(eager, xs, ys))
    assert counters["stats"]["unique_graphs"] > 0
    assert_same_params(model, eager, atol=1e-5)
    # Once the engine has hooked every layer, no global hook is left (it would make every later
    # compiled call warn and fire hooks on the compiled wrapper).
    assert not nn.modules.module._has_any_global_hook()


class _ConvNet(nn.Module):
    """Two convolution stages with GroupNorm and a strided shortcut, as in a small ResNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.GroupNorm(2, 4))
        self.main = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.GroupNorm(2, 8))
        self.shortcut = nn.Conv2d(4, 8, 1, 2, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.main(h) + self.shortcut(h))
        return self.head(h.mean((2, 3)))


def test_a_compiled_convolutional_model_trains_and_equals_eager() -> None:
    """AOTAutograd donated the saved tensors of these compiled regions (a backward frees them
    after one pass), which the engine's several passes cannot use: the first compiled step raised
    with a hint to compile the model, as the user had. Building the optimizer turns donation off."""
    eager = _ConvNet()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    optimizer = JDSGD(model.parameters(), lr=0.05, momentum=0.9, batch_dim=0)
    reference = JDSGD(eager.parameters(), lr=0.05, momentum=0.9, batch_dim=0)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
        optimizer.step(lambda: nn.functional.cross_entropy(compiled(x), y, reduction="none"))
        reference.step(lambda: nn.functional.cross_entropy(eager(x), y, reduction="none"))
    assert_same_params(model, eager, atol=1e-5)


def test_a_compiled_loss_function_trains_and_re_enabled_donation_is_a_clear_error() -> None:
    """Compiling the loss computation itself: once the batch size changed, AOTAutograd freed the
    saved tensors after one backward pass. With donation off (as the optimizer sets it) it trains;
    with donation turned on again, the error says so."""
    import torch._functorch.config as functorch_config

    model = _model()
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)

    @torch.compile
    def losses(xs: Tensor, ys: Tensor) -> Tensor:
        return (model(xs).squeeze(-1) - ys) ** 2

    for batch in (6, 6, 4, 4):
        xs, ys = torch.randn(batch, 5), torch.randn(batch)
        optimizer.step(lambda xs=xs, ys=ys: losses(xs, ys))
    torch._dynamo.reset()
    functorch_config.donated_buffer = True
    try:
        with pytest.raises(ValueError, match="donated"):
            for batch in (6, 6, 4, 4):
                xs, ys = torch.randn(batch, 5), torch.randn(batch)
                optimizer.step(lambda xs=xs, ys=ys: losses(xs, ys))
    finally:
        functorch_config.donated_buffer = False
        torch._dynamo.reset()
