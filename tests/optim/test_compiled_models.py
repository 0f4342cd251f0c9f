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


def test_a_compiled_loss_function_whose_backward_donates_its_buffers_is_a_clear_error() -> None:
    """Compiling the loss computation itself (not the model): once the batch size changes,
    AOTAutograd frees the saved tensors after one backward pass, which the Gramian cannot work
    with; the error says what to compile instead (it was torch's message about create_graph)."""
    model = _model()
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)

    @torch.compile
    def losses(xs: Tensor, ys: Tensor) -> Tensor:
        return (model(xs).squeeze(-1) - ys) ** 2

    with pytest.raises(ValueError, match="donated"):
        for batch in (6, 6, 4, 4):
            xs, ys = torch.randn(batch, 5), torch.randn(batch)
            optimizer.step(lambda xs=xs, ys=ys: losses(xs, ys))
