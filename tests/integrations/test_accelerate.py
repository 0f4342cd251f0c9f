"""accelerate's Accelerator drives jdoptim optimizers through ``backward(accelerator, optimizer, losses)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from jdoptim.aggregation import NashMTLWeighting, UPGradWeighting
from jdoptim.optim import JDSGD
from jdoptim.paths import StepRecord
from tests.integrations._problem import (
    BATCH,
    LossFn,
    batches,
    instance_losses,
    loader,
    make_data,
    make_net,
    max_difference,
    task_losses,
)

accelerate = pytest.importorskip(
    "accelerate", reason="accelerate is not installed: pip install jdoptim[accelerate]"
)
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from jdoptim.integrations.accelerate import backward, jacobian_descent_optimizer  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    # accelerate keeps its configuration in process-wide singletons; each test sets its own.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def sgd(net: nn.Module, batch_dim: int | None) -> JDSGD:
    return JDSGD(net.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=batch_dim)


def accelerated_run(
    net: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    loss_fn: LossFn = instance_losses,
    batch_dim: int | None = 0,
    scaler: torch.amp.GradScaler | None = None,
    whole_step_in_autocast: bool = False,
    **accelerator_options: Any,
) -> tuple[list[Any], list[StepRecord]]:
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_options)
    if scaler is not None:
        accelerator.scaler = scaler
    model, optimizer, batches_ = accelerator.prepare(net, sgd(net, batch_dim), loader(*data))
    returned, records = [], []
    for x, y in batches_:
        with accelerator.accumulate(model), contextlib.ExitStack() as stack:
            if whole_step_in_autocast:
                stack.enter_context(accelerator.autocast())
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                losses = loss_fn(model, x, y)
            records.append(backward(accelerator, optimizer, losses))
            returned.append(optimizer.step())
            optimizer.zero_grad()
    return returned, records


def whole_batch_loop(
    net: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    loss_fn: LossFn = instance_losses,
    batch_dim: int | None = 0,
    size: int = BATCH,
    autocast: torch.dtype | None = None,
) -> None:
    optimizer = sgd(net, batch_dim)
    for _, (x, y) in zip(range(len(data[0]) // size), batches(*data, size=size), strict=False):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
            losses = loss_fn(net, x, y)
        optimizer.backward(losses)
        optimizer.step()


def test_accumulate_equals_the_whole_batch_step() -> None:
    data = make_data()
    net = make_net()
    returned, records = accelerated_run(net, data, gradient_accumulation_steps=2)

    whole_batch = make_net()
    whole_batch_loop(whole_batch, data, size=2 * BATCH)
    assert max_difference(net, whole_batch) == 0.0
    per_batch = make_net()
    whole_batch_loop(per_batch, data)
    assert max_difference(net, per_batch) > 1e-3  # accumulation did change the steps
    # step() returns None through AcceleratedOptimizer; the step record holds the losses.
    assert returned == [None] * 4
    assert [tuple(r.losses.shape) for r in records] == [(BATCH,), (2 * BATCH,)] * 2


def test_accumulate_of_per_task_losses_equals_the_whole_batch_step() -> None:
    data = make_data(outputs=2)
    net = make_net(outputs=2)
    accelerated_run(net, data, loss_fn=task_losses, batch_dim=None, gradient_accumulation_steps=2)
    whole_batch = make_net(outputs=2)
    whole_batch_loop(whole_batch, data, loss_fn=task_losses, batch_dim=None, size=2 * BATCH)
    assert max_difference(net, whole_batch) <= 1e-6


def task_loss_list(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    return list(task_losses(net, x, y).unbind())


def test_per_task_losses_as_a_list_equal_the_stacked_losses() -> None:
    """A list of per-task scalars, which optimizer.backward takes, crashed the helper (list / int,
    list.device)."""
    data = make_data(outputs=2)
    net = make_net(outputs=2)
    accelerated_run(
        net, data, loss_fn=task_loss_list, batch_dim=None, gradient_accumulation_steps=2
    )
    stacked = make_net(outputs=2)
    accelerated_run(
        stacked, data, loss_fn=task_losses, batch_dim=None, gradient_accumulation_steps=2
    )
    assert max_difference(net, stacked) == 0.0
    assert max_difference(net, make_net(outputs=2)) > 1e-3


@pytest.mark.parametrize("whole_step_in_autocast", [False, True], ids=["forward", "whole step"])
def test_bf16_mixed_precision_trains_on_cpu(whole_step_in_autocast: bool) -> None:
    # accelerate runs the prepared model's forward under autocast; accelerator.autocast() may
    # also enclose backward(), whose Gramian and weights must stay in float32.
    data = make_data()
    net = make_net()
    accelerated_run(
        net, data, mixed_precision="bf16", whole_step_in_autocast=whole_step_in_autocast
    )
    by_hand = make_net()
    whole_batch_loop(by_hand, data, autocast=torch.bfloat16)
    assert max_difference(net, by_hand) == 0.0
    in_float32 = make_net()
    whole_batch_loop(in_float32, data)
    assert max_difference(net, in_float32) > 1e-5  # the forward did run in bfloat16


def test_loss_scaling_with_the_accelerator_grad_scaler() -> None:
    # accelerate makes a GradScaler only for fp16 on GPUs; a CPU GradScaler set in its place runs
    # the same path: backward() scales the losses, AcceleratedOptimizer.step unscales and steps.
    data = make_data()
    net = make_net()
    accelerated_run(net, data, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))

    by_hand = make_net()
    optimizer = sgd(by_hand, 0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _, (x, y) in zip(range(4), batches(*data), strict=False):
        with torch.autocast("cpu", dtype=torch.float16):
            losses = instance_losses(by_hand, x, y)
        optimizer.backward(scaler.scale(losses))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert max_difference(net, by_hand) == 0.0
    assert max_difference(net, make_net()) > 1e-3


def test_loss_scaling_leaves_a_scale_dependent_weighting_unchanged() -> None:
    """NashMTL's weights depend on the losses' scale: the optimizer weighs the losses the
    accelerator's scaler scaled as unscaled (it used to step 2^10 times too short here)."""
    data = make_data()
    scaled, plain = make_net(), make_net()
    for net, scaler in ((scaled, torch.amp.GradScaler("cpu", init_scale=2.0**10)), (plain, None)):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = accelerate.Accelerator(cpu=True)
        accelerator.scaler = scaler
        optimizer = JDSGD(net.parameters(), lr=0.1, weighting=NashMTLWeighting(), batch_dim=0)
        model, optimizer, loaded = accelerator.prepare(net, optimizer, loader(*data))
        for x, y in loaded:
            backward(accelerator, optimizer, instance_losses(model, x, y))
            optimizer.step()
            optimizer.zero_grad()
    assert max_difference(scaled, plain) < 1e-6
    assert max_difference(scaled, make_net()) > 1e-3


def test_a_torch_optimizer_is_refused_with_a_clear_error() -> None:
    net = make_net()
    with pytest.raises(TypeError, match="not a jdoptim optimizer"):
        jacobian_descent_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
