"""Bad inputs get clear errors, and the engine stays usable afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def _still_works(engine: Engine, model: nn.Module) -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    output = model(x).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10


def test_output_that_does_not_require_grad() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    with torch.no_grad():
        output = model(torch.randn(3, 5, dtype=torch.float64)).sum(dim=1)
    with pytest.raises(ValueError, match="does not require grad"):
        engine.compute_gramian(output)
    _still_works(engine, model)


def test_output_not_computed_by_covered_modules() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    other = nn.Linear(5, 1).double()
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        engine.compute_gramian(other(torch.randn(3, 5, dtype=torch.float64)).squeeze(1))
    _still_works(engine, model)


@pytest.mark.parametrize("batch_dim", [2, -3])
def test_batch_dim_out_of_range(batch_dim: int) -> None:
    model = _model()
    engine = Engine(model, batch_dim=batch_dim)
    with pytest.raises(ValueError, match="out of range"):
        engine.compute_gramian(model(torch.randn(3, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="scalar"):
        engine.compute_gramian(model(torch.randn(3, 5, dtype=torch.float64)).sum())


def test_a_batch_size_no_layer_processed_takes_the_exact_route_with_a_warning() -> None:
    """A wrong batch_dim, losses from several forward passes, or layers that see the instances
    flattened ([B*S, d] rows): the exact route is right in each (it was a ValueError)."""
    model = _model()
    engine = Engine(model, batch_dim=1)  # the output's dim 1 holds 2 tasks, not the 3 instances
    output = model(torch.randn(3, 5, dtype=torch.float64))
    with pytest.warns(UserWarning, match="batch size 2.*exact route"):
        gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    engine = Engine(model, batch_dim=0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)  # a per-token model on flattened rows
    output = model(x.reshape(12, 5)).reshape(4, 3, 2).pow(2).sum(dim=(1, 2))
    with pytest.warns(UserWarning, match="exact route"):
        gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    two_passes = torch.cat([model(x[0]), model(x[1])]).pow(2).sum(dim=1)
    with pytest.warns(UserWarning, match="exact route"):
        gramian = engine.compute_gramian(two_passes)
    assert relative_error(gramian, loop_gramian(two_passes, list(model.parameters()))) <= 1e-10
    _still_works(engine, model)


def test_freed_graph() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(3, 5, dtype=torch.float64)).pow(2).sum(dim=1)
    output.sum().backward()
    with pytest.raises(RuntimeError, match="already freed"):
        engine.compute_gramian(output)
    _still_works(engine, model)


def test_backward_needs_a_gramian_first_and_runs_once() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    with pytest.raises(RuntimeError, match="compute_gramian"):
        engine.backward(torch.ones(3))
    output = model(torch.randn(3, 5, dtype=torch.float64)).pow(2).sum(dim=1)
    engine.compute_gramian(output)
    with pytest.raises(ValueError, match="shape"):
        engine.backward(torch.ones(4))
    with pytest.raises(RuntimeError, match="compute_gramian"):
        engine.backward(torch.ones(3))  # the failed call consumed the saved state


def test_a_forward_discards_the_saved_state() -> None:
    model = _model()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(3, 5, dtype=torch.float64)
    engine.compute_gramian(model(x).sum(dim=1))
    model(x)
    with pytest.raises(RuntimeError, match="compute_gramian"):
        engine.backward(torch.ones(3))


def test_constructor_arguments() -> None:
    model = _model()
    with pytest.raises(TypeError, match="batch_dim"):
        Engine(model, batch_dim=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="modules"):
        Engine(torch.ones(2), batch_dim=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modules"):
        Engine(batch_dim=0)
    # The three spellings cover the same parameters, each once.
    spellings = [
        Engine(model, batch_dim=0),
        Engine(model.modules(), batch_dim=0),
        Engine(model[0], model[2], model, batch_dim=0),
    ]
    for engine in spellings:
        assert [id(p) for p in engine.parameters] == [id(p) for p in model.parameters()]


class _ComplexScale(nn.Module):
    """Scales a complex signal by a complex parameter, held as one or as its real pairs."""

    def __init__(self, as_pairs: bool) -> None:
        super().__init__()
        values = torch.randn(3, 2, dtype=torch.float64)
        self.as_pairs = as_pairs
        self.scale = nn.Parameter(values if as_pairs else torch.view_as_complex(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.view_as_complex(self.scale) if self.as_pairs else self.scale
        return (x * scale).abs().pow(2).sum(dim=1)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_complex_parameters_are_refused_and_their_real_pairs_are_exact(
    batch_dim: int | None,
) -> None:
    """Their Gramian would need the real and imaginary parts as separate coordinates: refused
    rather than computed from the real parts alone (silently wrong); as real pairs it is exact."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.complex128)
    refused = _ComplexScale(as_pairs=False)
    with pytest.raises(TypeError, match="real parameters only"):
        Engine(refused, batch_dim=batch_dim).compute_gramian(refused(x))
    pairs = _ComplexScale(as_pairs=True)
    output = pairs(x)
    gramian = Engine(pairs, batch_dim=batch_dim).compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, [pairs.scale])) <= 1e-10
