"""A ``torch.compile``d model runs compiled graphs and gets the same Gramian as in eager mode.

The engine's hooks run eagerly (dynamo breaks the graph around each hooked module call), so each
layer's call stays visible to autograd while the operations between layers are compiled. Graphs
are counted with dynamo's counters, never timed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from jdoptim.autogram import Engine
from tests._marks import COMPILING
from tests.autogram._reference import relative_error, routes

pytestmark = COMPILING


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.gelu(self.first(x)) * 2 + 1
        h = self.norm(h).sin() + h
        return self.second(h)


def test_compiled_model_runs_compiled_graphs_with_the_exact_gramian() -> None:
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(6, 5)
    compiled = torch.compile(model)
    engine = Engine(model, batch_dim=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = compiled(x).pow(2).sum(dim=1)
        gramian = engine.compute_gramian(output)
    assert not [w for w in caught if "compiled region" in str(w.message)]  # no fallback
    assert counters["stats"]["unique_graphs"] > 0
    assert output.grad_fn is not None
    assert set(routes(engine, model).values()) == {"closed_form"}
    weights = torch.rand(6)
    engine.backward(weights)
    fused = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    engine.close()
    with Engine(model, batch_dim=0) as eager:
        expected = eager.compute_gramian(model(x).pow(2).sum(dim=1))
    assert relative_error(gramian, expected) <= 1e-5
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum(dim=1).backward(weights)
    for actual, p in zip(fused, model.parameters(), strict=True):
        assert p.grad is not None
        assert relative_error(actual, p.grad) <= 1e-5


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.5, -0.5]))


def test_a_call_fused_with_its_inputs_takes_the_exact_route_and_warns_once() -> None:
    """As when a compiled region holds a layer together with the operations before it."""
    torch.manual_seed(0)
    module = Scale()
    engine = Engine(module, batch_dim=0)
    x = torch.randn(4, 2)
    for step in range(2):
        both = torch.cat([x, x * 2]) * module.gain
        first, second = both.chunk(2)  # both come from the same autograd node
        engine._hook(module, (first,), {}, second)  # the call: first -> second, one node
        output = (second * first).sum(dim=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gramian = engine.compute_gramian(output)
        assert len(caught) == (1 if step == 0 else 0)
        if step == 0:
            assert "Scale" in str(caught[0].message)
        jacobian = torch.stack(
            [torch.autograd.grad(o, module.gain, retain_graph=True)[0] for o in output]
        )
        assert relative_error(gramian, jacobian @ jacobian.T) <= 1e-6
        assert set(engine._last_routes.values()) == {"exact"}


@pytest.mark.parametrize("batch_dim", [None])
def test_compiled_model_without_batch_dim(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(3, 3)
    compiled = torch.compile(model)
    engine = Engine(model, batch_dim=batch_dim)
    gramian = engine.compute_gramian(compiled(x).pow(2).sum(dim=1))
    expected = Engine(model, batch_dim=batch_dim).compute_gramian(model(x).pow(2).sum(dim=1))
    assert relative_error(gramian, expected) <= 1e-5


def test_discovery_mode_compiles_after_the_first_pass() -> None:
    """``Engine(parameters=...)`` + ``capture()``, as the optimizers run a closure."""
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(6, 5)
    compiled = torch.compile(model)
    engine = Engine(batch_dim=0, parameters=model.parameters())
    for step in range(2):
        with engine.capture():
            output = compiled(x).pow(2).sum(dim=1)
        gramian = engine.compute_gramian(output)
        assert set(routes(engine, model).values()) == {"closed_form"}
        assert (counters["stats"]["unique_graphs"] > 0) == (step == 1)  # discovery runs eagerly
    engine.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with Engine(model, batch_dim=0) as eager:
        expected = eager.compute_gramian(model(x).pow(2).sum(dim=1))
    assert relative_error(gramian, expected) <= 1e-5


def test_discovery_contexts_closed_in_any_order_leave_compiled_code_compiled() -> None:
    first = Engine(batch_dim=0, parameters=nn.Linear(2, 2).parameters())
    second = Engine(batch_dim=0, parameters=nn.Linear(2, 2).parameters())
    opened_first, opened_second = first.capture(), second.capture()
    opened_first.__enter__()
    opened_second.__enter__()
    opened_first.__exit__(None, None, None)  # closed before the one opened after it
    opened_second.__exit__(None, None, None)

    @torch.compile
    def double(x: Tensor) -> Tensor:
        return x * 2

    double(torch.ones(3))
    assert counters["stats"]["unique_graphs"] > 0
