"""JacobianDescent against hand-written loops, and as a torch.optim citizen."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam

import jdoptim
from jdoptim.aggregation import (
    Flattening,
    Mean,
    MeanWeighting,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
)
from jdoptim.autogram import Engine
from jdoptim.autojac import backward, jac_to_grad, mtl_backward
from jdoptim.optim import JDSGD, JacobianDescent, JDAdam, JDAdamW
from tests.optim._models import (
    EMAWeighting,
    assert_same_params,
    clone_model,
    per_instance_losses,
    regression_problem,
)


def run_jd(optimizer: JacobianDescent, model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    for x, y in zip(inputs, targets, strict=True):

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            return per_instance_losses(model, x, y)

        optimizer.step(closure)


def test_mean_weighting_equals_sgd_on_the_mean_loss() -> None:
    model, inputs, targets = regression_problem(steps=5)
    reference = clone_model(model)
    run_jd(JDSGD(model.parameters(), lr=0.1, weighting=MeanWeighting()), model, inputs, targets)
    sgd = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(inputs, targets, strict=True):
        sgd.zero_grad()
        per_instance_losses(reference, x, y).mean().backward()
        sgd.step()
    assert_same_params(model, reference, atol=1e-12)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("fuse_backward", [True, False])
def test_upgrad_equals_the_hand_written_engine_loop(
    batch_dim: int | None, fuse_backward: bool
) -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = clone_model(model)
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        weighting=UPGradWeighting(),
        batch_dim=batch_dim,
        fuse_backward=fuse_backward,
    )
    run_jd(optimizer, model, inputs, targets)

    sgd = SGD(reference.parameters(), lr=0.1)
    engine = Engine(reference.modules(), batch_dim=batch_dim)
    weighting = UPGradWeighting()
    for x, y in zip(inputs, targets, strict=True):
        losses = per_instance_losses(reference, x, y)
        sgd.zero_grad()
        weights = weighting(engine.compute_gramian(losses))
        losses.backward(weights)
        sgd.step()
    assert_same_params(model, reference, atol=1e-10)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_per_instance_losses_start_the_dual_cone_solver_cold(
    batch_dim: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per-instance rows are other objectives every step: the last step's projections would only
    # mislead the solver. Per-task rows (batch_dim=None here: each loss its own objective) keep the
    # warm start. Either way the state is kept (for a checkpoint) and the steps are the same.
    import jdoptim.aggregation.upgrad as upgrad_module

    starts: list[bool] = []
    original = upgrad_module.project_to_dual_cone

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        starts.append(kwargs.get("warm_start") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(upgrad_module, "project_to_dual_cone", spy)
    model, inputs, targets = regression_problem(steps=3)
    weighting = UPGradWeighting()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting, batch_dim=batch_dim)
    run_jd(optimizer, model, inputs, targets)
    assert starts == ([False, False, False] if batch_dim == 0 else [False, True, True])
    assert weighting.state_dict()["_extra_state"]["solutions"].shape[0] == inputs.shape[1]


def test_upgrad_equals_the_hand_written_autojac_loop() -> None:
    model, inputs, targets = regression_problem(steps=3)
    reference = clone_model(model)
    run_jd(
        JDSGD(model.parameters(), lr=0.1, aggregator=UPGrad(), batch_dim=0), model, inputs, targets
    )
    sgd = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(inputs, targets, strict=True):
        backward(per_instance_losses(reference, x, y))
        jac_to_grad(reference.parameters(), UPGrad())
        sgd.step()
        sgd.zero_grad()
    assert_same_params(model, reference, atol=1e-10)


def test_jdadam_equals_autojac_then_adam() -> None:
    model, inputs, targets = regression_problem(steps=4)
    reference = clone_model(model)
    run_jd(JDAdam(model.parameters(), lr=0.01, weighting=UPGradWeighting()), model, inputs, targets)
    adam = Adam(reference.parameters(), lr=0.01)
    for x, y in zip(inputs, targets, strict=True):
        adam.zero_grad()
        backward(per_instance_losses(reference, x, y))
        jac_to_grad(reference.parameters(), UPGrad())
        adam.step()
    assert_same_params(model, reference, atol=1e-10)


class _RowNormWeighting(Weighting):
    """Needs the Jacobian itself: weights inversely proportional to the rows' norms."""

    input_kind = "matrix"

    def forward(self, matrix: Tensor, /) -> Tensor:
        return 1.0 / (matrix.norm(dim=1) + 1.0)


def test_matrix_weighting_takes_the_jacobian_path() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=_RowNormWeighting())
    run_jd(optimizer, model, inputs, targets)
    sgd = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(inputs, targets, strict=True):
        sgd.zero_grad()
        backward(per_instance_losses(reference, x, y))
        jac_to_grad(reference.parameters(), WeightedAggregator(_RowNormWeighting()))
        sgd.step()
    assert_same_params(model, reference, atol=1e-12)


def test_a_scalar_loss_with_the_mean_weighting_is_torchs_step_without_a_warning() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=MeanWeighting())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]).mean())


def test_scalar_losses_give_a_plain_gradient_step() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="The losses are a scalar") as caught:
        for x, y in zip(inputs, targets, strict=True):
            optimizer.zero_grad()
            optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y).mean())
    assert len([w for w in caught if "scalar" in str(w.message)]) == 1  # once per optimizer
    sgd = SGD(reference.parameters(), lr=0.1)
    for x, y in zip(inputs, targets, strict=True):
        sgd.zero_grad()
        per_instance_losses(reference, x, y).mean().backward()
        sgd.step()
    assert_same_params(model, reference, atol=1e-12)


def test_instance_wise_multi_task_losses_use_the_flattened_gramian() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    reference = clone_model(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    optimizer = JDSGD(
        model.parameters(), lr=0.1, weighting=Flattening(UPGradWeighting()), batch_dim=0
    )
    losses = optimizer.step(lambda: (model(x) - y) ** 2)
    assert losses.shape == (6, 2) and not losses.requires_grad
    backward(((reference(x) - y) ** 2).reshape(-1))
    jac_to_grad(reference.parameters(), UPGrad())
    SGD(reference.parameters(), lr=0.1).step()
    assert_same_params(model, reference, atol=1e-10)


def test_multi_task_mode_equals_mtl_backward_loop() -> None:
    torch.manual_seed(2)
    trunk = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).double()
    heads = nn.ModuleList([nn.Linear(3, 1).double() for _ in range(2)])
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    reference = clone_model(model)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)

    def task_losses(net: nn.ModuleDict) -> tuple[Tensor, Tensor]:
        features = net["trunk"](x)
        losses = torch.stack(
            [
                ((head(features).squeeze(-1) - y[:, t]) ** 2).mean()
                for t, head in enumerate(net["heads"])
            ]
        )
        return losses, features

    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        aggregator=UPGrad(),
        shared_params=trunk.parameters(),
        tasks_params=[h.parameters() for h in heads],
    )
    optimizer.step(lambda: task_losses(model))

    losses, features = task_losses(reference)
    mtl_backward(
        losses,
        features,
        tasks_params=[list(h.parameters()) for h in reference["heads"]],
        shared_params=list(reference["trunk"].parameters()),
    )
    jac_to_grad(list(reference["trunk"].parameters()), UPGrad())
    SGD(reference.parameters(), lr=0.1).step()
    assert_same_params(model, reference, atol=1e-12)


def test_resume_from_checkpoint_is_bit_identical() -> None:
    model, inputs, targets = regression_problem(steps=6)
    start = clone_model(model)

    def make(net: nn.Module) -> JacobianDescent:
        return JDAdam(net.parameters(), lr=0.01, weighting=EMAWeighting(), batch_dim=0)

    uninterrupted = make(model)
    run_jd(uninterrupted, model, inputs, targets)

    first = make(start)
    run_jd(first, start, inputs[:3], targets[:3])
    buffer = io.BytesIO()
    torch.save({"model": start.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model = clone_model(start)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)  # fresh optimizer and fresh weighting
    resumed.load_state_dict(checkpoint["optimizer"])
    assert resumed.method._state["calls"] == 3
    run_jd(resumed, resumed_model, inputs[3:], targets[3:])
    assert_same_params(model, resumed_model)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6),
    ],
    ids=["StepLR", "CosineAnnealingLR", "OneCycleLR"],
)
def test_lr_schedulers_drive_the_shared_param_groups(make_scheduler) -> None:  # type: ignore[no-untyped-def]
    model, inputs, targets = regression_problem(steps=5)
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, momentum=0.9, weighting=MeanWeighting())
    scheduler = make_scheduler(optimizer)
    sgd = SGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference_scheduler = make_scheduler(sgd)
    for x, y in zip(inputs, targets, strict=True):
        optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y))
        optimizer.zero_grad()
        sgd.zero_grad()
        per_instance_losses(reference, x, y).mean().backward()
        sgd.step()
        scheduler.step()
        reference_scheduler.step()
        assert optimizer.param_groups[0]["lr"] == sgd.param_groups[0]["lr"]
        assert optimizer.optimizer.param_groups is optimizer.param_groups
    assert_same_params(model, reference, atol=1e-12)


def test_add_param_group_and_hooks() -> None:
    model, inputs, targets = regression_problem(steps=1)
    first, second = model[0], model[2]
    optimizer = JDSGD(first.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    optimizer.add_param_group({"params": list(second.parameters()), "lr": 0.05})
    assert len(optimizer.optimizer.param_groups) == 2
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    assert calls == ["pre", "post"]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_zero_grad_clears_jac_and_grad() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=UPGrad())
    backward(per_instance_losses(model, inputs[0], targets[0]))
    assert all(hasattr(p, "jac") for p in model.parameters())
    optimizer.zero_grad()
    assert all(getattr(p, "jac", None) is None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_trainer_style_keyword_closure_and_returned_losses() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDAdamW(model.parameters(), lr=0.01, weighting=UPGradWeighting(), batch_dim=0)
    losses = optimizer.step(closure=lambda: per_instance_losses(model, inputs[0], targets[0]))
    assert losses.shape == (8,) and not losses.requires_grad


def test_after_step_receives_step_info() -> None:
    seen = []

    class Listening(EMAWeighting):
        def after_step(self, info: jdoptim.StepInfo) -> None:  # public, for such signatures
            seen.append((info.step, info.lr, info.losses.shape, info.evaluate().shape))

    model, inputs, targets = regression_problem(steps=2)
    weighting = Listening()
    assert isinstance(weighting, jdoptim.StepAware)
    run_jd(JDSGD(model.parameters(), lr=0.1, weighting=weighting), model, inputs, targets)
    assert seen == [(1, 0.1, (8,), (8,)), (2, 0.1, (8,), (8,))]


def test_grad_scaler_step_matches_the_unscaled_step() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = clone_model(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    run_jd(
        JDSGD(model.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler), model, inputs, targets
    )
    run_jd(JDSGD(reference.parameters(), lr=0.1, batch_dim=0), reference, inputs, targets)
    assert_same_params(model, reference, atol=1e-10)


@pytest.mark.parametrize(
    "losses_given", ["scaled", "unscaled", "scaled, reshaped", "scaled, joined"]
)
@pytest.mark.parametrize("stepped_by", ["optimizer", "scaler"])
def test_grad_scaler_given_with_backward_then_step_is_the_unscaled_step(
    losses_given: str, stepped_by: str
) -> None:
    """With grad_scaler=, optimizer.backward takes scaler.scale(losses) or the losses themselves
    (scaled on the way, as step(closure) does), and a plain optimizer.step() goes through the
    scaler as scaler.step(optimizer) does. A plain step applied the scaled .grad (1024 times too
    long), and unscaled losses made the scaler's step 1024 times too short."""
    model, inputs, targets = regression_problem(steps=3)
    reference = clone_model(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler)
    for x, y in zip(inputs, targets, strict=True):
        optimizer.zero_grad()
        losses = per_instance_losses(model, x, y)
        given = {
            "scaled": lambda: scaler.scale(losses),
            "unscaled": lambda: losses,
            # The scale further down the graph: scaled all the same (not scaled twice).
            "scaled, reshaped": lambda: scaler.scale(losses[:, None]).reshape(-1),
            "scaled, joined": lambda: torch.cat([scaler.scale(half) for half in losses.chunk(2)]),
        }[losses_given]()
        optimizer.backward(given)
        if stepped_by == "optimizer":
            optimizer.step()  # unscales, skips an overflow and updates, as step(closure)
        else:
            scaler.step(optimizer)
            scaler.update()
    run_jd(JDSGD(reference.parameters(), lr=0.1, batch_dim=0), reference, inputs, targets)
    assert_same_params(model, reference, atol=1e-10)
    assert optimizer._steps == 3 and scaler.get_scale() == 2.0**10


def test_a_plain_step_through_the_grad_scaler_skips_an_overflow_and_backs_off() -> None:
    model, inputs, targets = regression_problem(steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]) * float("inf"))
    optimizer.step()  # skipped, as scaler.step(optimizer) skips it
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert optimizer._steps == 0 and scaler.get_scale() == 2.0**9


def test_a_closure_that_backpropagates_its_losses_itself() -> None:
    """Its gradients are discarded (with a warning) while the graph lives; once its backward freed
    the graph, a ValueError says what to do (it was the engine's error about compute_gramian)."""
    model, inputs, targets = regression_problem(steps=1)
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)

    def retaining() -> Tensor:
        losses = per_instance_losses(model, inputs[0], targets[0])
        losses.mean().backward(retain_graph=True)
        return losses

    with pytest.warns(UserWarning, match="computed gradients itself"):
        optimizer.step(retaining)
    run_jd(JDSGD(reference.parameters(), lr=0.1, batch_dim=0), reference, inputs, targets)
    assert_same_params(model, reference, atol=1e-12)

    def freeing() -> Tensor:
        optimizer.zero_grad()
        losses = per_instance_losses(model, inputs[0], targets[0])
        losses.mean().backward()
        return losses

    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="freed their graph"):
        optimizer.step(freeing)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_torchs_closure_on_a_scalar_loss_steps_from_its_gradient() -> None:
    model, inputs, targets = regression_problem(steps=1)
    reference = clone_model(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = per_instance_losses(model, inputs[0], targets[0]).mean()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="scalar loss itself"):
        returned = optimizer.step(closure)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = per_instance_losses(reference, inputs[0], targets[0]).mean()
    loss.backward()
    sgd.step()
    assert returned is not None and torch.equal(returned, loss.detach())
    assert_same_params(model, reference, atol=0.0)


# --- failures leave everything as it was ---------------------------------------------------------


def _snapshot(model: nn.Module, optimizer: JacobianDescent) -> tuple[list[Tensor], bytes]:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return [p.detach().clone() for p in model.parameters()], buffer.getvalue()


@pytest.mark.parametrize(
    ("closure_output", "error"),
    [
        (lambda losses: losses * float("nan"), ValueError),
        (lambda losses: losses.detach(), ValueError),
        (lambda losses: "not a tensor", TypeError),
        (lambda losses: losses[:0], ValueError),
    ],
    ids=["nan", "no-grad", "wrong-type", "empty"],
)
def test_a_failed_step_changes_nothing(closure_output, error) -> None:  # type: ignore[no-untyped-def]
    model, inputs, targets = regression_problem(steps=2)
    optimizer = JDAdam(model.parameters(), lr=0.01, weighting=EMAWeighting(), batch_dim=0)
    run_jd(optimizer, model, inputs[:1], targets[:1])
    params_before, state_before = _snapshot(model, optimizer)
    with pytest.raises(error):
        optimizer.step(lambda: closure_output(per_instance_losses(model, inputs[1], targets[1])))
    params_after, state_after = _snapshot(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after, strict=True))
    assert state_before == state_after


def test_a_failing_weighting_restores_the_method_state() -> None:
    class Exploding(EMAWeighting):
        def forward(self, gramian: Tensor, /) -> Tensor:
            super().forward(gramian)
            raise ValueError("boom")

    model, inputs, targets = regression_problem(steps=1)
    weighting = Exploding()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting)
    with pytest.raises(ValueError, match="boom"):
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    assert weighting._state == {}


def test_bad_arguments_are_rejected() -> None:
    model, _, _ = regression_problem()
    with pytest.raises(TypeError, match="callable"):
        JDSGD(model.parameters()).step(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one"):
        JDSGD(model.parameters(), weighting=UPGradWeighting(), aggregator=Mean())
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        JacobianDescent(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Aggregator"):
        JDSGD(model.parameters(), aggregator=UPGradWeighting())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modules="):
        JDSGD(model.parameters(), modules=model[0])
    with pytest.raises(ValueError, match="lacks"):  # another kind of optimizer's state
        JDSGD(model.parameters()).load_state_dict(Adam(model.parameters()).state_dict())
    with pytest.raises(TypeError, match="pass it as weighting="):
        JDSGD(model.parameters(), scalarizer=MeanWeighting())
    with pytest.raises(TypeError, match="pass it as aggregator="):
        JDSGD(model.parameters(), scalarizer=Mean())
    with pytest.raises(TypeError, match="GradScaler, got bool"):
        JDSGD(model.parameters(), grad_scaler=True)  # type: ignore[arg-type]


@pytest.mark.parametrize("modules", [True, False], ids=["modules=", "discovered"])
def test_freezing_and_unfreezing_does_not_pile_up_engine_hooks(modules: bool) -> None:
    model, inputs, targets = regression_problem(steps=1)
    options = {"modules": model} if modules else {}
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0, **options)

    def hook_counts() -> list[int]:
        return [len(m._forward_hooks) for m in model.modules()]

    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    counts = hook_counts()
    global_hooks = len(nn.modules.module._global_forward_hooks)
    for _ in range(10):
        model[0].weight.requires_grad_(False)
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
        model[0].weight.requires_grad_(True)
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
        assert hook_counts() == counts
        assert len(nn.modules.module._global_forward_hooks) == global_hooks


def test_after_step_evaluation_runs_without_gradients() -> None:
    class Watching(EMAWeighting):
        def after_step(self, info: Any) -> None:
            self.seen = info.evaluate()

    model, inputs, targets = regression_problem(steps=1)
    weighting = Watching()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting, batch_dim=0)
    grad_modes: list[bool] = []

    def closure() -> Tensor:
        grad_modes.append(torch.is_grad_enabled())
        return per_instance_losses(model, inputs[0], targets[0])

    optimizer.step(closure)
    assert grad_modes == [True, False]
    assert not weighting.seen.requires_grad


def test_gramian_weighting_is_an_alias_of_weighting() -> None:
    model, _, _ = regression_problem()
    weighting = UPGradWeighting()
    assert JDSGD(model.parameters(), gramian_weighting=weighting).method is weighting
    with pytest.raises(ValueError, match="alias"):
        JDSGD(model.parameters(), weighting=weighting, gramian_weighting=UPGradWeighting())


def test_multi_task_errors_say_what_to_do() -> None:
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 2)
    optimizer = JDSGD([*trunk.parameters(), *head.parameters()], shared_params=trunk.parameters())
    x = torch.randn(5, 3)

    def instance_task_losses() -> tuple[Tensor, Tensor]:
        features = trunk(x)
        return head(features) ** 2, features  # [B, T]

    with pytest.raises(ValueError, match="batch_dim=0"):
        optimizer.step(instance_task_losses)

    def listed() -> tuple[list[Tensor], Tensor]:
        features = trunk(x)
        outputs = head(features)
        return [outputs[:, 0].pow(2).mean(), outputs[:, 1].pow(2).mean()], features

    losses = optimizer.step(listed)  # a list of scalar task losses is stacked
    assert losses.shape == (2,)


def test_a_failing_after_step_restores_the_method_state_and_step_count() -> None:
    class FailingAfterStep(EMAWeighting):
        def after_step(self, info: Any) -> None:
            self._state["calls"] = -1  # a change the failure must not leave behind
            raise RuntimeError("after_step broke")

    model, inputs, targets = regression_problem(steps=1)
    weighting = FailingAfterStep()
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting, batch_dim=0)
    with pytest.raises(RuntimeError, match="after_step broke"):
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    assert weighting._state == {}
    assert optimizer._steps == 0


def test_a_batchnorm_model_with_batch_dim_accumulates_its_per_instance_losses_exactly() -> None:
    """BatchNorm in training mode under batch_dim=0: each micro-batch normalises by its own
    statistics (as in torch), and the step is Jacobian descent on the per-instance losses of all
    micro-batches joined, with a warning that the layers before the norm take the exact route.
    The optimizer raised and advised batch_dim=None, which sums micro-batches as per-task losses:
    instance i of one micro-batch added to instance i of the next."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    reference = copy.deepcopy(model)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"BatchNorm1d\(4\) mixes the instances"):
        for xs, ys in zip(x.split(6), y.split(6), strict=True):
            optimizer.backward((model(xs).squeeze(-1) - ys) ** 2)
    optimizer.step()

    params = list(reference.parameters())
    rows = []
    for xs, ys in zip(x.split(6), y.split(6), strict=True):
        losses = (reference(xs).squeeze(-1) - ys) ** 2
        for loss in losses:
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    direction = UPGradWeighting()(jacobian @ jacobian.T) @ jacobian
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(params) - 0.1 * direction, params
        )
    assert_same_params(model, reference, atol=1e-12)


def test_losses_of_the_wrong_form_name_the_fix_for_each_mode() -> None:
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(5, 3)

    def pair() -> tuple[Tensor, Tensor]:
        features = trunk(x)
        return head(features).pow(2).mean(dim=0), features

    plain = JDSGD([*trunk.parameters(), *head.parameters()], lr=0.1)
    with pytest.raises(TypeError, match="shared_params="):  # multi-task losses, no multi-task mode
        plain.step(pair)

    def per_instance_tasks() -> tuple[list[Tensor], Tensor]:
        features = trunk(x)
        outputs = head(features)
        return [outputs[:, 0] ** 2, outputs[:, 1] ** 2], features

    multi_task = JDSGD(
        [*trunk.parameters(), *head.parameters()], lr=0.1, shared_params=trunk.parameters()
    )
    with pytest.raises(TypeError, match=r"one scalar.*\[B, T\] tensor with batch_dim=0"):
        multi_task.step(per_instance_tasks)


def test_warnings_point_at_the_users_line() -> None:
    """A fixed stacklevel pointed inside jdoptim from some entry points (the batch-statistics
    warning always did): the first frame outside jdoptim and torch is the user's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    x = torch.randn(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.backward(model(x).squeeze(-1) ** 2)  # the batch-statistics warning
        optimizer.step()
        optimizer.step(lambda: model(x).pow(2).mean())  # the scalar-loss warning
    assert len(caught) == 2
    assert all(warning.filename == __file__ for warning in caught), [w.filename for w in caught]
