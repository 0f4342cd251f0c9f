"""The optimizer seen through wrappers that trainers put around it, and through subclasses."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from jdoptim.aggregation import UPGradWeighting
from jdoptim.optim import JDSGD, JacobianDescent
from tests.optim._models import (
    assert_same_params,
    clone_model,
    per_instance_losses,
    regression_problem,
)


class ForwardingWrapper:
    """Like trainers' optimizer wrappers: its class subclasses the wrapped optimizer's class (so
    ``isinstance`` checks pass) without running its ``__init__``, and forwards unknown attributes."""

    def __init__(self, optimizer: Optimizer) -> None:
        self._wrapped = optimizer
        self.__class__ = type(
            "Wrapped" + type(optimizer).__name__, (ForwardingWrapper, type(optimizer)), {}
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


def _optimizer() -> tuple[JDSGD, Any]:
    model, _, _ = regression_problem()
    optimizer = JDSGD(model.parameters(), lr=0.1, momentum=0.9, weighting=UPGradWeighting())
    return optimizer, ForwardingWrapper(optimizer)


def test_a_forwarding_wrapper_reads_the_shared_bookkeeping() -> None:
    optimizer, wrapper = _optimizer()
    assert isinstance(wrapper, JacobianDescent)
    assert wrapper.param_groups is optimizer.param_groups
    assert wrapper.state is optimizer.state
    assert wrapper.defaults is optimizer.defaults


def test_a_forwarding_wrapper_writes_through_to_the_wrapped_optimizer() -> None:
    optimizer, wrapper = _optimizer()
    groups = [{**optimizer.param_groups[0], "lr": 0.5}]
    wrapper.param_groups = groups
    assert optimizer.param_groups is groups
    assert optimizer.optimizer.param_groups is groups
    state: Any = {}
    wrapper.state = state
    assert optimizer.state is state
    assert "_init_groups" not in vars(wrapper) and "_init_state" not in vars(wrapper)


def test_zero_grad_through_a_forwarding_wrapper_clears_the_gradients() -> None:
    optimizer, wrapper = _optimizer()
    params = optimizer.params()
    for param in params:
        param.grad = torch.ones_like(param)
    wrapper.zero_grad()
    assert all(param.grad is None for param in params)


class LoggingJDSGD(JDSGD):
    """A user subclass that sets its own attribute before and after the base __init__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.calls = 0
        super().__init__(*args, **kwargs)
        self.param_groups[0]["tag"] = "logged"

    def step(self, closure: Any = None) -> Any:
        self.calls += 1
        return super().step(closure)


def test_a_subclass_shares_the_inner_optimizer_bookkeeping() -> None:
    model, _, _ = regression_problem()
    optimizer = LoggingJDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting())
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert optimizer.optimizer.param_groups[0]["tag"] == "logged"
    assert optimizer.state is optimizer.optimizer.state


def test_a_closure_returning_none_after_backward_updates_from_grad() -> None:
    model, inputs, targets = regression_problem()
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    expected = JDSGD(reference.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
    optimizer.step(lambda: None)
    expected.backward(per_instance_losses(reference, inputs[0], targets[0]))
    expected.step()
    assert_same_params(model, reference)
