"""Backward-then-step, exact gradient accumulation, clipping and the step record.

References are hand-written: ``step(closure)`` on the same batch, the concatenated batch for
accumulation, and ``torch.func`` Jacobians for the record.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.aggregation import (
    GradVacWeighting,
    MeanWeighting,
    StateSizeError,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
)
from jdoptim.autogram import Route
from jdoptim.optim import JDSGD, JacobianDescent
from jdoptim.scalarization import GeometricMean
from tests.optim._models import (
    EMAWeighting,
    assert_same_params,
    per_instance_losses,
    regression_problem,
)

Options = dict[str, Any]

# (options, batch_dim-like kind of losses): every path of the optimizer.
PATHS: dict[str, Options] = {
    "gramian": {"weighting": UPGradWeighting(), "batch_dim": 0},
    "gramian-unfused": {"weighting": UPGradWeighting(), "batch_dim": 0, "fuse_backward": False},
    "shape-only weights": {"weighting": MeanWeighting(), "batch_dim": 0},
    "jacobian": {"aggregator": TrimmedMean(1), "batch_dim": 0},
    "per-task gramian": {"weighting": UPGradWeighting(), "batch_dim": None},
    "per-task mean": {"weighting": MeanWeighting(), "batch_dim": None},
    "full-jacobian aggregator": {"aggregator": UPGrad(), "batch_dim": None},
    "scalarizer": {"scalarizer": GeometricMean(), "batch_dim": 0},
}


def _fresh(options: Options) -> Options:
    return {k: copy.deepcopy(v) if isinstance(v, nn.Module) else v for k, v in options.items()}


@pytest.mark.parametrize("name", list(PATHS))
def test_backward_then_step_equals_step_with_a_closure(name: str) -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, **_fresh(PATHS[name]))
    closure_optimizer = JDSGD(reference.parameters(), lr=0.1, **_fresh(PATHS[name]))
    for x, y in zip(inputs, targets, strict=True):
        optimizer.backward(per_instance_losses(model, x, y))
        optimizer.step()
        optimizer.zero_grad()
        closure_optimizer.step(lambda x=x, y=y: per_instance_losses(reference, x, y))
    assert_same_params(model, reference, atol=1e-12)


def test_multi_task_backward_then_step_equals_step_with_a_closure() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).double()
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)]).double()
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def losses_of(m: nn.Module) -> tuple[Tensor, Tensor]:
        features = m["trunk"](x)
        outputs = torch.cat([head(features) for head in m["heads"]], dim=1)
        return ((outputs - y) ** 2).mean(dim=0), features

    options: Options = {"weighting": UPGradWeighting()}
    optimizer = JDSGD(model.parameters(), lr=0.1, shared_params=trunk.parameters(), **options)
    closure_optimizer = JDSGD(
        reference.parameters(),
        lr=0.1,
        shared_params=reference["trunk"].parameters(),
        weighting=UPGradWeighting(),
    )
    for _ in range(2):
        losses, features = losses_of(model)
        optimizer.backward(losses, features=features)
        optimizer.step()
        optimizer.zero_grad()
        closure_optimizer.step(lambda: losses_of(reference))
    assert_same_params(model, reference, atol=1e-12)


def test_clipping_between_backward_and_step_sees_the_direction() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]) * 100)
    norm_before = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert float(norm_before) > 0.5  # the direction was there to be clipped
    norm_after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(float(norm_after), 0.5, rtol=1e-6, atol=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    moved = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
    )
    torch.testing.assert_close(float(moved.norm()), 0.1 * 0.5, rtol=1e-6, atol=0.0)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.linear = nn.Linear(3 * 4 * 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.tanh(self.conv(x)).flatten(1)).squeeze(-1)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1)).squeeze(-1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (5,)),
    "cnn": (_ConvNet, (2, 4, 4)),
    "transformer encoder": (_Encoder, (3, 8)),
}


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of attention's backward
@pytest.mark.parametrize("kind", list(MODELS))
def test_accumulated_micro_batches_equal_the_concatenated_batch(kind: str) -> None:
    factory, shape = MODELS[kind]
    torch.manual_seed(0)
    model = factory().double()
    reference = copy.deepcopy(model)
    x = torch.randn(9, *shape, dtype=torch.float64)
    y = torch.randn(9, dtype=torch.float64)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    for part in (slice(0, 4), slice(4, 5), slice(5, 9)):  # unequal, one of a single instance
        optimizer.backward((model(x[part]) - y[part]) ** 2)
    optimizer.step()
    assert optimizer.last_step is not None
    assert optimizer.last_step.losses.shape == (9,)
    whole = JDSGD(reference.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    whole.step(lambda: (reference(x) - y) ** 2)
    assert_same_params(model, reference, atol=1e-10)


def test_accumulated_task_losses_are_summed() -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting())

    def task_losses(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        losses = per_instance_losses(m, x, y)
        return torch.stack([losses[:4].mean(), losses[4:].mean()])

    for x, y in zip(inputs, targets, strict=True):
        optimizer.backward(task_losses(model, x, y))
    optimizer.step()
    whole = JDSGD(reference.parameters(), lr=0.1, weighting=UPGradWeighting())
    whole.step(
        lambda: sum(task_losses(reference, x, y) for x, y in zip(inputs, targets, strict=True))
    )
    assert_same_params(model, reference, atol=1e-10)


def test_zero_grad_or_step_starts_a_new_window_and_other_gradients_are_kept() -> None:
    model, inputs, targets = regression_problem(steps=2)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
    optimizer.zero_grad()
    optimizer.backward(per_instance_losses(model, inputs[1], targets[1]))
    only_second = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()
    # A gradient the user added before (say a regulariser) stays under the direction.
    sum(p.square().sum() for p in model.parameters()).backward()
    regulariser = [p.grad.clone() for p in model.parameters()]
    optimizer.backward(per_instance_losses(model, inputs[1], targets[1]))
    for param, a, b in zip(model.parameters(), only_second, regulariser, strict=True):
        torch.testing.assert_close(param.grad, a + b, atol=1e-12, rtol=0.0)


@pytest.mark.parametrize(
    "reset",
    ["optimizer", "model", "wrapped optimizer", "grad.zero_()"],
)
def test_zeroing_grad_in_place_between_backwards_starts_a_new_window(reset: str) -> None:
    """As torch's .grad accumulates: zeroed in place (zero_grad(set_to_none=False), zero_()),
    the first micro-batch is gone. The window judged by identity alone kept it, silently."""
    model, inputs, targets = regression_problem(steps=2)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
    if reset == "optimizer":
        optimizer.zero_grad(set_to_none=False)
    elif reset == "model":
        model.zero_grad(set_to_none=False)
    elif reset == "wrapped optimizer":
        optimizer.optimizer.zero_grad(set_to_none=False)
    else:
        for param in model.parameters():
            assert param.grad is not None
            param.grad.zero_()
    optimizer.backward(per_instance_losses(model, inputs[1], targets[1]))
    fresh = copy.deepcopy(model)
    for param in fresh.parameters():
        param.grad = None
    alone = JDSGD(fresh.parameters(), lr=0.1, batch_dim=0)
    alone.backward(per_instance_losses(fresh, inputs[1], targets[1]))
    for param, expected in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad, atol=1e-12, rtol=0.0)


def test_torchs_closure_zeroing_in_place_steps_like_torch() -> None:
    """loss.backward() after zero_grad(set_to_none=False) accumulates into the same .grad
    tensors: from the second step on, the closure's backward went unseen and the step crashed."""
    model, inputs, targets = regression_problem(steps=3)
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)

    def closure(net: nn.Module, opt: Any, x: Tensor, y: Tensor) -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = per_instance_losses(net, x, y).mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in zip(inputs, targets, strict=True):
            optimizer.step(lambda x=x, y=y: closure(model, optimizer, x, y))
            sgd.step(lambda x=x, y=y: closure(reference, sgd, x, y))
    assert_same_params(model, reference, atol=0.0)


@pytest.mark.parametrize("method", ["weighting", "aggregator"])
def test_accumulation_moves_a_stateful_methods_state_once_per_step(method: str) -> None:
    """Each backward weighs the window's micro-batches together from the method's state when the
    window opened; it used to weigh from the state the previous micro-batch had left, so the
    state moved once per micro-batch and the step was not the whole batch's."""
    from jdoptim.aggregation import MoCo
    from tests.optim._models import EMAWeighting

    def make() -> tuple[nn.Module, JDSGD]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        options: dict[str, Any] = (
            {"weighting": EMAWeighting()} if method == "weighting" else {"aggregator": MoCo()}
        )
        return model, JDSGD(model.parameters(), lr=0.1, **options)

    def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return ((model(x) - y) ** 2).sum(dim=0)  # [2] per-task sums: micro-batches add up

    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(6, 5, dtype=torch.float64, generator=generator),
            torch.randn(6, 2, dtype=torch.float64, generator=generator),
        )
        for _ in range(3)
    ]
    whole, whole_optimizer = make()
    split, split_optimizer = make()
    for x, y in data:
        whole_optimizer.backward(task_losses(whole, x, y))
        whole_optimizer.step()
        whole_optimizer.zero_grad()
        for part in (slice(0, 3), slice(3, 6)):
            split_optimizer.backward(task_losses(split, x[part], y[part]))
        split_optimizer.step()
        split_optimizer.zero_grad()
    assert_same_params(split, whole, atol=1e-12)
    saved_split = split_optimizer.state_dict()["jdoptim"]["method"]
    saved_whole = whole_optimizer.state_dict()["jdoptim"]["method"]
    assert saved_split.keys() == saved_whole.keys()
    if method == "weighting":
        assert saved_split["_extra_state"]["calls"] == saved_whole["_extra_state"]["calls"] == 3


def test_clipping_after_every_micro_batch_keeps_the_accumulation_exact() -> None:
    """accelerate's loop clips after each micro-batch; an in-place edit that is no reset must not
    end the window (it did once .grad's version was watched: the step became the sum of two
    windows' directions, 2.7 times too long in the docs' example)."""
    model, inputs, targets = regression_problem(steps=1)
    whole = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    for part in (slice(0, 4), slice(4, 8)):
        optimizer.backward(per_instance_losses(model, inputs[0][part], targets[0][part]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    reference = JDSGD(whole.parameters(), lr=0.1, batch_dim=0)
    reference.backward(per_instance_losses(whole, inputs[0], targets[0]))
    torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.01)
    for param, expected in zip(model.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad, atol=1e-12, rtol=0.0)


def test_a_second_backward_on_the_same_losses_is_refused_as_torch_does() -> None:
    model, inputs, targets = regression_problem(steps=2)
    losses = per_instance_losses(model, inputs[0], targets[0])
    losses.sum().backward()
    with pytest.raises(RuntimeError):  # torch: the graph was freed by the first backward
        losses.sum().backward()
    model.zero_grad()
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    losses = per_instance_losses(model, inputs[0], targets[0])
    optimizer.backward(losses)
    once = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="already called on these losses"):
        optimizer.backward(losses)
    # Refused before touching anything: .grad is the first backward's.
    for param, grad in zip(model.parameters(), once, strict=True):
        assert torch.equal(param.grad, grad)
    optimizer.step()
    with pytest.raises(RuntimeError, match="already called on these losses"):
        optimizer.backward(losses)
    # A new forward pass (even on the same inputs) is a new graph.
    optimizer.zero_grad()
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))

    # A backward that failed consumed nothing: the same losses may be given again.
    class FailsOnce(MeanWeighting):
        failed = False

        def forward(self, gramian: Tensor, /) -> Tensor:
            if not self.failed:
                self.failed = True
                raise ValueError("once")
            return super().forward(gramian)

    other = JDSGD(model.parameters(), lr=0.1, weighting=FailsOnce(), batch_dim=0)
    other.zero_grad()
    losses = per_instance_losses(model, inputs[1], targets[1])
    with pytest.raises(ValueError, match="once"):
        other.backward(losses)
    other.backward(losses)


def test_a_closure_without_zero_grad_gives_the_same_step() -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = copy.deepcopy(model)
    forgetful = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    careful = JDSGD(reference.parameters(), lr=0.1, batch_dim=0)
    for x, y in zip(inputs, targets, strict=True):
        forgetful.step(lambda x=x, y=y: per_instance_losses(model, x, y))

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            careful.zero_grad()
            return per_instance_losses(reference, x, y)

        careful.step(closure)
    assert_same_params(model, reference)


def test_a_closure_that_calls_backward_itself_has_no_effect_and_warns() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    careful = JDSGD(reference.parameters(), lr=0.1, batch_dim=0)

    def closure(x: Tensor, y: Tensor) -> Tensor:
        losses = per_instance_losses(model, x, y)
        losses.sum().backward(retain_graph=True)
        return losses

    with pytest.warns(UserWarning, match="called backward"):
        for x, y in zip(inputs, targets, strict=True):
            optimizer.step(lambda x=x, y=y: closure(x, y))
            careful.step(lambda x=x, y=y: per_instance_losses(reference, x, y))
    assert_same_params(model, reference, atol=1e-12)


def test_a_closure_that_calls_optimizer_backward_is_a_trainer_closure() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    careful = JDSGD(reference.parameters(), lr=0.1, batch_dim=0)
    for x, y in zip(inputs, targets, strict=True):

        def trainer_closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            losses = per_instance_losses(model, x, y)
            optimizer.backward(losses)
            return losses.detach().mean()  # what a trainer's closure returns

        optimizer.step(trainer_closure)
        optimizer.zero_grad()
        careful.step(lambda x=x, y=y: per_instance_losses(reference, x, y))
    assert_same_params(model, reference, atol=1e-12)


def test_step_without_backward_warns_that_it_is_a_plain_step() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    per_instance_losses(model, inputs[0], targets[0]).mean().backward()
    with pytest.warns(UserWarning, match="plain gradient step"):
        optimizer.step()


def test_cross_gramian_methods_explain_that_they_need_the_closure() -> None:
    from jdoptim.aggregation import SDMGradWeighting

    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=SDMGradWeighting())
    with pytest.raises(TypeError, match=r"step\(closure\)"):
        optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_the_step_record_matches_torch_func(batch_dim: int | None) -> None:
    model, inputs, targets = regression_problem(steps=1)
    x, y = inputs[0], targets[0]
    params = dict(model.named_parameters())
    jacobian = jacrev(lambda p: per_instance_losses_of(model, p, x, y))(params)
    rows = torch.cat([j.reshape(x.shape[0], -1) for j in jacobian.values()], dim=1).detach()
    gramian = rows @ rows.T
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=batch_dim)
    optimizer.step(lambda: per_instance_losses(model, x, y))
    record = optimizer.last_step
    assert record is not None
    torch.testing.assert_close(record.gramian, gramian, atol=1e-12, rtol=0.0)
    torch.testing.assert_close(record.weights, UPGradWeighting()(gramian), atol=1e-10, rtol=0.0)
    assert record.conflicting_pairs == int((torch.triu(gramian, 1) < 0).sum())
    assert record.increased_by_mean == int((gramian.sum(dim=1) < 0).sum())
    direction = record.weights @ rows
    mean = rows.mean(dim=0)
    cosine = float(direction @ mean / (direction.norm() * mean.norm()))
    assert record.cosine_to_mean == pytest.approx(cosine, abs=1e-10)
    assert set(record.summary()) >= {"mean_loss", "max_loss", "conflicting_pairs"}


def per_instance_losses_of(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> Tensor:
    return (functional_call(model, params, (x,)).squeeze(-1) - y) ** 2


def test_a_hook_on_a_shape_only_weighting_sees_the_real_gramian() -> None:
    model, inputs, targets = regression_problem(steps=1)
    x, y = inputs[0], targets[0]
    weighting = MeanWeighting()
    seen: list[Tensor] = []
    weighting.register_forward_hook(lambda _, args, __: seen.append(args[0]))
    params = dict(model.named_parameters())
    jacobian = jacrev(lambda p: per_instance_losses_of(model, p, x, y))(params)
    rows = torch.cat([j.reshape(x.shape[0], -1) for j in jacobian.values()], dim=1).detach()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting, batch_dim=0)
    optimizer.step(lambda: per_instance_losses(model, x, y))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], rows @ rows.T, atol=1e-12, rtol=0.0)


def test_jacobian_descent_wraps_other_optimizers_in_backward_mode() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = copy.deepcopy(model)
    optimizer = JacobianDescent(torch.optim.Adam(model.parameters(), lr=0.01), batch_dim=0)
    careful = JacobianDescent(torch.optim.Adam(reference.parameters(), lr=0.01), batch_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in zip(inputs, targets, strict=True):
            optimizer.backward(per_instance_losses(model, x, y))
            optimizer.step()
            optimizer.zero_grad()
            careful.step(lambda x=x, y=y: per_instance_losses(reference, x, y))
    assert_same_params(model, reference, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "expected_shape"),
    [
        ({"weighting": MeanWeighting(), "batch_dim": None}, (2,)),  # per task: summed
        ({"scalarizer": GeometricMean(), "batch_dim": 0}, (8,)),  # per instance: concatenated
    ],
    ids=["per-task mean", "scalarizer"],
)
def test_accumulated_losses_of_gradient_paths_keep_their_meaning(
    options: Options, expected_shape: tuple[int, ...]
) -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, **_fresh(options))
    x, y = inputs[0], targets[0]
    parts = []
    for half in (slice(0, 4), slice(4, 8)):
        losses = per_instance_losses(model, x[half], y[half])
        if options["batch_dim"] is None:
            losses = torch.stack([losses[:2].mean(), losses[2:].mean()])
        parts.append(losses.detach())
        optimizer.backward(losses)
    record = optimizer.last_step
    assert record is not None and record.losses.shape == expected_shape
    expected = parts[0] + parts[1] if options["batch_dim"] is None else torch.cat(parts)
    torch.testing.assert_close(record.losses, expected)


def test_the_first_backward_finds_the_layers_of_its_forward() -> None:
    """The optimizer watches forward passes from its construction on, so the first backward (with
    no modules= given) takes the layers' closed forms, not the exact per-row route."""
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
    routes = {report.route for report in optimizer._get_engine().route_report()}
    assert routes and Route.EXACT not in routes


def test_a_smaller_last_batch_restarts_per_instance_state_with_a_warning() -> None:
    """Stateful weightings learn state per objective; per-instance objectives change with every
    batch, and a batch of another size (the last one of an epoch) restarts the state, exactly as a
    fresh weighting would step, instead of raising."""
    model, inputs, targets = regression_problem(steps=3)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=GradVacWeighting(), batch_dim=0)
    for x, y in zip(inputs[:2], targets[:2], strict=True):
        optimizer.backward(per_instance_losses(model, x, y))
        optimizer.step()
        optimizer.zero_grad()
    x, y = inputs[2][:5], targets[2][:5]
    fresh_model = copy.deepcopy(model)
    fresh = JDSGD(fresh_model.parameters(), lr=0.1, weighting=GradVacWeighting(), batch_dim=0)
    fresh.backward(per_instance_losses(fresh_model, x, y))
    fresh.step()
    with pytest.warns(UserWarning, match="starts afresh"):
        optimizer.backward(per_instance_losses(model, x, y))
    optimizer.step()
    assert_same_params(model, fresh_model)


def test_per_task_state_still_refuses_another_number_of_tasks() -> None:
    model = nn.Linear(3, 3)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=GradVacWeighting())
    x = torch.randn(4, 3)
    optimizer.backward(model(x).pow(2).mean(dim=0))
    optimizer.step()
    with pytest.raises(StateSizeError, match="reset"):
        optimizer.backward(model(x).pow(2).mean(dim=0)[:2])


def test_a_sparse_gradient_left_from_the_last_step_opens_the_next_window() -> None:
    """Without zero_grad, the next window starts on the .grad left in place, sparse ones too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    ids = torch.randint(0, 10, (6, 2))
    for _ in range(3):
        optimizer.backward(model(ids).squeeze(1) ** 2)
        optimizer.step()
    grad = model[0].weight.grad
    assert grad is not None and grad.is_sparse
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "inner",
    [
        lambda p: torch.optim.RMSprop(p, lr=0.01),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: torch.optim.NAdam(p, lr=0.01),
        lambda p: torch.optim.Rprop(p, lr=0.01),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    ],
    ids=["RMSprop", "Adagrad", "NAdam", "Rprop", "SGD-nesterov"],
)
def test_any_torch_optimizer_steps_as_on_the_mean_loss_with_the_mean_weighting(
    inner: Callable[[Any], torch.optim.Optimizer],
) -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = copy.deepcopy(model)
    optimizer = JacobianDescent(inner(model.parameters()), weighting=MeanWeighting(), batch_dim=0)
    plain = inner(reference.parameters())
    for x, y in zip(inputs, targets, strict=True):
        optimizer.backward(per_instance_losses(model, x, y))
        optimizer.step()
        optimizer.zero_grad()
        plain.zero_grad()
        per_instance_losses(reference, x, y).mean().backward()
        plain.step()
    assert_same_params(model, reference, atol=1e-12)


def test_an_optimizer_whose_step_needs_a_closure_is_refused() -> None:
    model, _, _ = regression_problem(steps=1)
    with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure"):
        JacobianDescent(torch.optim.LBFGS(model.parameters()), batch_dim=0)


def test_a_smaller_last_batch_restarts_a_per_instance_aggregators_state() -> None:
    """MoCo and ExcessMTL take the Jacobian path, which lacked the restart that weightings had: a
    smaller last batch raised StateSizeError instead."""
    from jdoptim.aggregation import MoCo

    model, inputs, targets = regression_problem(steps=2)
    optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=MoCo(), batch_dim=0)
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    with pytest.warns(UserWarning, match="starts afresh"):
        optimizer.step(lambda: per_instance_losses(model, inputs[1][:5], targets[1][:5]))


def test_a_failed_backward_in_a_window_leaves_the_methods_state_as_it_was() -> None:
    """The window re-weighs from the method's state when it opened; a backward that raises must
    still give back the state the previous backward left, as it gives back .grad."""
    from tests.optim._models import EMAWeighting

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2)).double()
    weighting = EMAWeighting()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting)
    x = torch.randn(6, 5, dtype=torch.float64)
    optimizer.backward(model(x[:3]).pow(2).sum(dim=0))
    state = copy.deepcopy(weighting.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError):
        optimizer.backward(model(x[3:]).pow(2)[:, 0])  # 3 task losses after 2
    assert weighting.state_dict()["_extra_state"]["calls"] == state["_extra_state"]["calls"] == 1
    for param, grad in zip(model.parameters(), grads, strict=True):
        assert torch.equal(param.grad, grad)


@pytest.mark.parametrize("clear", ["none", "zero_"])
def test_clearing_some_grads_between_micro_batches_keeps_the_window_for_the_others(
    clear: str,
) -> None:
    """Freezing a parameter between micro-batches (its .grad set to None, or zeroed): the next
    backward opened a new window for every parameter, so the others got the sum of two windows'
    directions instead of the whole batch's. The frozen one stays cleared."""
    model, inputs, targets = regression_problem(steps=1)
    whole = copy.deepcopy(model)
    frozen = model[0].bias
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    for part in (slice(0, 4), slice(4, 8)):
        optimizer.backward(per_instance_losses(model, inputs[0][part], targets[0][part]))
        if clear == "none":
            frozen.grad = None
        else:
            assert frozen.grad is not None
            frozen.grad.zero_()
    reference = JDSGD(whole.parameters(), lr=0.1, batch_dim=0)
    reference.backward(per_instance_losses(whole, inputs[0], targets[0]))
    for (name, param), expected in zip(model.named_parameters(), whole.parameters(), strict=True):
        if param is frozen:
            assert param.grad is None if clear == "none" else not bool(param.grad.any())
        else:
            torch.testing.assert_close(param.grad, expected.grad, atol=1e-12, rtol=0.0, msg=name)


def test_a_grad_replaced_between_micro_batches_keeps_the_users_change() -> None:
    """A .grad replaced by another tensor mid-window: the difference from what the window wrote is
    kept (as torch keeps any .grad it is given), and the other parameters keep the window."""
    model, inputs, targets = regression_problem(steps=1)
    whole = copy.deepcopy(model)
    edited = model[0].weight
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0][:4], targets[0][:4]))
    assert edited.grad is not None
    change = torch.ones_like(edited)
    edited.grad = edited.grad + change
    optimizer.backward(per_instance_losses(model, inputs[0][4:], targets[0][4:]))
    reference = JDSGD(whole.parameters(), lr=0.1, batch_dim=0)
    reference.backward(per_instance_losses(whole, inputs[0], targets[0]))
    for param, expected in zip(model.parameters(), whole.parameters(), strict=True):
        added = change if param is edited else 0.0
        torch.testing.assert_close(param.grad, expected.grad + added, atol=1e-12, rtol=0.0)


class TwoExperts(nn.Module):
    """Top-1 routing over two experts; an expert no instance is routed to is not called (with
    ``call_unused``: called on no rows, so its .grad is zero rather than None)."""

    call_unused = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(3, 2)
        self.experts = nn.ModuleList([nn.Linear(3, 4), nn.Linear(3, 4)])
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        probs = self.gate(x).softmax(-1)
        chosen = probs.argmax(-1)
        out = torch.zeros(x.shape[0], 4, dtype=x.dtype)
        for index, expert in enumerate(self.experts):
            rows = (chosen == index).nonzero().squeeze(-1)
            if rows.numel() or self.call_unused:
                out = out.index_add(0, rows, expert(x[rows]) * probs[rows, index : index + 1])
        return self.head(torch.tanh(out)).squeeze(-1)


def test_micro_batches_that_reach_different_parameters_accumulate_exactly() -> None:
    """An expert no instance of a micro-batch was routed to: that micro-batch's losses have zero
    gradients for it. The accumulation raised a ValueError, where torch's accumulates."""
    torch.manual_seed(0)
    model = TwoExperts().double()
    whole = copy.deepcopy(model)
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, dtype=torch.float64)
    with torch.no_grad():
        chosen = model.gate(x).softmax(-1).argmax(-1)
    parts = [slice(0, 2), slice(2, 16)]  # the first two go to expert 0 alone
    assert any(len(set(chosen[part].tolist())) == 1 for part in parts)  # one expert skipped
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    for part in parts:
        optimizer.backward((model(x[part]) - y[part]) ** 2)
    optimizer.step()
    reference = JDSGD(whole.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    reference.step(lambda: (whole(x) - y) ** 2)
    assert_same_params(model, whole, atol=1e-10)


def test_per_token_losses_of_another_length_in_a_micro_batch_are_a_clear_error() -> None:
    model = nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 7))
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)

    def token_losses(tokens: Tensor) -> Tensor:  # [B, T]
        logits = model(tokens).transpose(1, 2)
        return nn.functional.cross_entropy(logits, tokens.roll(1, 1), reduction="none")

    optimizer.backward(token_losses(torch.randint(0, 7, (3, 5))))
    with pytest.raises(ValueError, match=r"shapes \(3, 5\), \(2, 3\).*except along batch_dim=0"):
        optimizer.backward(token_losses(torch.randint(0, 7, (2, 3))))
    optimizer.backward(token_losses(torch.randint(0, 7, (2, 5))))  # the window goes on
    assert optimizer.last_step is not None and optimizer.last_step.losses.shape == (5, 5)


class UnguardedExperts(TwoExperts):
    """Calls every expert, also on no rows: an expert unused by a micro-batch gets zero .grad."""

    call_unused = True


def _assert_experts_accumulate_exactly(
    model: TwoExperts, between: Callable[[nn.Module], None]
) -> None:
    """Two micro-batches (the first two instances go to expert 0 alone), ``between`` run after
    each backward: .grad must equal the whole batch's."""
    model = model.double()
    whole = copy.deepcopy(model)
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, dtype=torch.float64)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    for part in (slice(0, 2), slice(2, 16)):
        optimizer.backward((model(x[part]) - y[part]) ** 2)
        between(model)
    reference = JDSGD(whole.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    reference.backward((whole(x) - y) ** 2)
    for param, expected in zip(model.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad, atol=1e-12, rtol=0.0)


def test_clipping_a_zero_grad_between_micro_batches_does_not_freeze_it() -> None:
    """Clipping edits every .grad in place; one that was zero stays zero, and taking that for a
    parameter frozen by zero_() dropped its gradient from every later micro-batch."""
    torch.manual_seed(0)

    def clip(model: nn.Module) -> None:  # changes nothing but the versions
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)

    _assert_experts_accumulate_exactly(UnguardedExperts(), clip)


def test_a_grad_zeroed_then_replaced_between_micro_batches_takes_the_new_value() -> None:
    """Zeroed in place (frozen), then given a tensor R: the window's base (the .grad from before
    the window) came back, R + base instead of R plus the later micro-batches' change."""
    model, inputs, targets = regression_problem(steps=1)
    param = model[0].weight
    param.grad = torch.full_like(param, 100.0)  # the base the window opens on
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0][:4], targets[0][:4]))
    assert param.grad is not None
    param.grad.zero_()
    optimizer.backward(per_instance_losses(model, inputs[0][4:6], targets[0][4:6]))
    assert param.grad is not None and not bool(param.grad.any())  # frozen
    replacement = torch.ones_like(param)
    param.grad = replacement
    optimizer.backward(per_instance_losses(model, inputs[0][6:], targets[0][6:]))
    assert param.grad is not None and float((param.grad - replacement).abs().max()) < 10.0


def test_a_checkpoint_taken_mid_window_resumes_by_redoing_the_step() -> None:
    """state_dict() between two backward calls of a step saved the method's state after the
    partial window's weighing, beside the step count of before the step: redoing the step after
    loading it moved the method's state twice."""
    model, inputs, targets = regression_problem(steps=3)
    x, y = inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1)
    parts = [slice(0, 8), slice(8, 16), slice(16, 24)]

    def losses(net: nn.Module, part: slice) -> Tensor:
        return per_instance_losses(net, x[part], y[part])

    reference = copy.deepcopy(model)
    uninterrupted = JDSGD(reference.parameters(), lr=0.1, weighting=EMAWeighting())
    for _ in range(2):
        for part in parts:
            uninterrupted.backward(losses(reference, part))
        uninterrupted.step()
        uninterrupted.zero_grad()

    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=EMAWeighting())
    for part in parts:
        optimizer.backward(losses(model, part))
    optimizer.step()
    optimizer.zero_grad()
    optimizer.backward(losses(model, parts[0]))
    saved = copy.deepcopy(optimizer.state_dict())  # mid-window
    resumed = JDSGD(model.parameters(), lr=0.1, weighting=EMAWeighting())
    resumed.load_state_dict(saved)
    for param in model.parameters():
        param.grad = None
    for part in parts:  # the interrupted step, redone whole
        resumed.backward(losses(model, part))
    resumed.step()
    assert_same_params(model, reference, atol=1e-12)


def test_none_grads_set_to_zeros_between_micro_batches_keep_accumulating() -> None:
    """A .grad that was None (an expert the first micro-batch skipped) set to zeros by the user
    (a DDP unused-parameter habit): taken for a parameter frozen mid-window, it stayed zero."""
    torch.manual_seed(0)

    def fill(model: nn.Module) -> None:
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    _assert_experts_accumulate_exactly(TwoExperts(), fill)


def test_a_sparse_table_whose_terms_take_two_forms_in_one_window() -> None:
    """The first micro-batch's forward ran before the optimizer existed (the exact route's rows),
    the second's took the closed form: joining them turned the sparse table's term into rows
    through a reshape of its sparse gradient, which raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1)).double()
    whole = copy.deepcopy(model)
    tokens = torch.randint(0, 7, (8, 3))
    first = model(tokens[:4]).squeeze(-1) ** 2  # before the optimizer watched a forward pass
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    optimizer.backward(first)
    optimizer.backward(model(tokens[4:]).squeeze(-1) ** 2)
    reference = JDSGD(whole.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    reference.backward(whole(tokens).squeeze(-1) ** 2)
    for param, expected in zip(model.parameters(), whole.parameters(), strict=True):
        assert param.grad is not None and expected.grad is not None
        assert param.grad.is_sparse == expected.grad.is_sparse
        torch.testing.assert_close(
            param.grad.to_dense(), expected.grad.to_dense(), atol=1e-12, rtol=0.0
        )
