"""The optimizers follow torch's conventions: state-dict layout and hooks, DCP, AMP, resuming."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from jdoptim import _global_hooks as global_hooks
from jdoptim.aggregation import (
    CRMOGMWeighting,
    MeanWeighting,
    MGDAWeighting,
    NashMTLWeighting,
    UPGradWeighting,
)
from jdoptim.autogram import Engine
from jdoptim.optim import JDSGD, JacobianDescent, JDAdam
from jdoptim.optim._loss_scale import grad_scaler_scale
from tests.optim._models import (
    EMAWeighting,
    assert_same_params,
    per_instance_losses,
    regression_problem,
)


def _trained(steps: int = 2) -> tuple[nn.Module, JDSGD, Tensor, Tensor]:
    model, inputs, targets = regression_problem(steps=steps + 2)
    optimizer = JDSGD(
        model.parameters(), lr=0.1, momentum=0.9, weighting=EMAWeighting(), batch_dim=0
    )
    for x, y in zip(inputs[:steps], targets[:steps], strict=True):
        optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y))
    return model, optimizer, inputs[steps:], targets[steps:]


def _continue(model: nn.Module, optimizer: JDSGD, inputs: Tensor, targets: Tensor) -> None:
    for x, y in zip(inputs, targets, strict=True):
        optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y))


def _copy(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_state_dict_has_torchs_layout_plus_one_key() -> None:
    _, optimizer, _, _ = _trained()
    state = optimizer.state_dict()
    assert set(state) == {"state", "param_groups", "jdoptim"}
    inner = optimizer.optimizer.state_dict()
    assert state["param_groups"] == inner["param_groups"]
    assert state["jdoptim"]["steps"] == 2
    assert state["jdoptim"]["method_type"] == "EMAWeighting"


def test_state_dict_hooks_fire() -> None:
    _, optimizer, _, _ = _trained()
    calls: list[str] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("post") or sd)
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load-pre") or sd)
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load-post"))
    optimizer.load_state_dict(optimizer.state_dict())
    assert calls == ["pre", "post", "load-pre", "load-post"]


def test_a_restored_optimizer_continues_bit_identically() -> None:
    model, optimizer, inputs, targets = _trained()
    state, params = _copy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
    _continue(model, optimizer, inputs, targets)
    fresh, _, _ = regression_problem(steps=1)
    fresh.load_state_dict(params)
    restored = JDSGD(
        fresh.parameters(), lr=0.5, momentum=0.9, weighting=EMAWeighting(), batch_dim=0
    )
    restored.load_state_dict(state)
    _continue(fresh, restored, inputs, targets)
    assert_same_params(model, fresh)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_as_the_original(how: str) -> None:
    """``copy.deepcopy`` / ``pickle`` of (model, optimizer), as with torch's optimizers: the copy
    steps the copied parameters with the copied method state, and leaves the original alone."""
    model, optimizer, inputs, targets = _trained()
    pair = (model, optimizer)
    copied_model, copied = (
        copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    )
    assert type(copied) is JDSGD and copied.method is not optimizer.method
    assert copied.optimizer.param_groups[0]["params"][0] is next(copied_model.parameters())
    assert copied.jd_state_dict()["steps"] == 2
    untouched = copy.deepcopy(model.state_dict())
    _continue(copied_model, copied, inputs, targets)
    for name, value in model.state_dict().items():
        assert torch.equal(value, untouched[name])
    _continue(model, optimizer, inputs, targets)
    assert_same_params(model, copied_model)


def _reaches_an_engine(roots: list[object], limit: int = 20000) -> bool:
    """Whether an :class:`Engine` is reachable from ``roots`` through object references."""
    seen: set[int] = set()
    frontier = list(roots)
    while frontier and len(seen) < limit:
        thing = frontier.pop()
        if id(thing) in seen:
            continue
        seen.add(id(thing))
        if type(thing) is Engine:
            return True
        frontier.extend(gc.get_referents(thing))
    return False


def test_a_trained_model_pickles_and_copies_without_its_engine() -> None:
    """``torch.save(model)`` / ``copy.deepcopy(model)`` after Jacobian-descent steps (the engine
    hooks the model's modules): the copy computes what the model computes, and no engine is copied
    along to record the copy's forward passes."""
    model, _, inputs, _ = _trained()
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]
    for twin in copies:
        hooks = [h for m in twin.modules() for h in (*m._forward_hooks.values(),)]
        assert not _reaches_an_engine(hooks)
    for twin in copies:
        torch.testing.assert_close(twin(inputs[0]), model(inputs[0]), rtol=0.0, atol=0.0)


def test_dcp_round_trip_with_the_jdoptim_state_beside_it() -> None:
    model, optimizer, inputs, targets = _trained()
    saved = _copy(get_optimizer_state_dict(model, optimizer))
    jd_saved = _copy(optimizer.jd_state_dict())
    params = copy.deepcopy(model.state_dict())
    _continue(model, optimizer, inputs, targets)

    fresh, _, _ = regression_problem(steps=1)
    fresh.load_state_dict(params)
    restored = JDSGD(
        fresh.parameters(), lr=0.1, momentum=0.9, weighting=EMAWeighting(), batch_dim=0
    )
    # On a fresh optimizer DCP takes a zero-lr step to create the state: it must change nothing.
    probe = get_optimizer_state_dict(fresh, restored)
    assert restored.param_groups[0]["lr"] == 0.1
    assert all(p.grad is None for p in fresh.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), params.values(), strict=True)
    )
    assert set(probe) == {"state", "param_groups"}
    with pytest.warns(UserWarning, match="jd_state_dict"):  # DCP keeps torch's keys only
        set_optimizer_state_dict(fresh, restored, saved)
    restored.load_jd_state_dict(jd_saved)
    assert restored._steps == 2
    _continue(fresh, restored, inputs, targets)
    assert_same_params(model, fresh)


def test_loading_without_the_jdoptim_entry_warns_for_stateful_methods() -> None:
    _, optimizer, _, _ = _trained()
    plain = {k: v for k, v in optimizer.state_dict().items() if k != "jdoptim"}
    with pytest.warns(UserWarning, match="load_jd_state_dict"):
        optimizer.load_state_dict(plain)


_RESUME = textwrap.dedent(
    """
    import sys, torch
    from jdoptim.optim import JDSGD
    from tests.optim._models import EMAWeighting, per_instance_losses, regression_problem
    model, inputs, targets = regression_problem(steps=4)
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    optimizer = JDSGD(model.parameters(), lr=0.1, momentum=0.9, weighting=EMAWeighting(), batch_dim=0)
    optimizer.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    for x, y in zip(inputs[2:], targets[2:]):
        optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y))
    torch.save(model.state_dict(), sys.argv[3])
    """
)


def test_a_checkpoint_resumes_in_a_fresh_process_with_weights_only(tmp_path: Path) -> None:
    model, optimizer, inputs, targets = _trained()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    _continue(model, optimizer, inputs, targets)
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "-c",
            _RESUME,
            *(str(tmp_path / n) for n in ("model.pt", "optimizer.pt", "out.pt")),
        ],
        check=True,
        cwd=root,
        timeout=120,
    )
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed[name]), name


def test_an_earlier_checkpoint_layout_still_loads() -> None:
    model, optimizer, _, _ = _trained()
    current = optimizer.state_dict()
    legacy = {
        "optimizer": {"state": current["state"], "param_groups": current["param_groups"]},
        "method": current["jdoptim"]["method"],
        "steps": current["jdoptim"]["steps"],
    }
    restored = JDSGD(
        model.parameters(), lr=0.3, momentum=0.9, weighting=EMAWeighting(), batch_dim=0
    )
    restored.load_state_dict(_copy(legacy))
    assert restored._steps == 2 and restored.param_groups[0]["lr"] == 0.1


def test_a_failed_load_changes_nothing() -> None:
    model, optimizer, _, _ = _trained()
    adam = JDAdam(model.parameters(), lr=0.01, weighting=EMAWeighting(), batch_dim=0)
    before = _copy(adam.state_dict())
    with pytest.raises(ValueError, match="betas"):
        adam.load_state_dict(optimizer.state_dict())
    assert _copy(adam.state_dict()).keys() == before.keys()
    assert adam.param_groups[0]["lr"] == 0.01 and "betas" in adam.param_groups[0]
    other = JDSGD(
        model.parameters(), lr=0.01, momentum=0.9, weighting=UPGradWeighting(), batch_dim=0
    )
    with pytest.raises(ValueError, match="EMAWeighting"):
        other.load_state_dict(optimizer.state_dict())
    assert other.param_groups[0]["lr"] == 0.01


# --- AMP: float16 autocast with a GradScaler -------------------------------------------------


class _Normed(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.norm = norm
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.linear(x)))).squeeze(-1)


@pytest.mark.parametrize(
    ("norm", "batch_dim"),
    [(nn.LayerNorm(8), 0), (nn.BatchNorm1d(8), None)],
    ids=["layernorm-instances", "batchnorm-tasks"],
)
def test_float16_autocast_with_a_grad_scaler_trains(norm: nn.Module, batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = _Normed(norm)
    x, y = torch.randn(16, 6), torch.randn(16)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = JDSGD(model.parameters(), lr=0.05, batch_dim=batch_dim, grad_scaler=scaler)

    def losses() -> Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            per_instance = (model(x).float() - y) ** 2
        if batch_dim is None:  # per-task losses: two halves of the batch
            return torch.stack([per_instance[:8].mean(), per_instance[8:].mean()])
        return per_instance

    first = float(losses().detach().mean())
    for _ in range(20):
        optimizer.zero_grad()
        optimizer.step(losses)
    assert float(losses().detach().mean()) < first
    assert optimizer._steps >= 15  # a few early steps may overflow at the initial scale

    # An overflow (finite float16 outputs, scaled gradients beyond float16's range): the step is
    # skipped, the scale halved, and the next step trains again.
    params = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    with torch.no_grad():
        model.head.weight.mul_(256.0)
    optimizer.step(losses)
    assert scaler.get_scale() == scale / 2
    with torch.no_grad():
        model.head.weight.div_(256.0)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    optimizer.step(losses)
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_backward_then_step_under_a_grad_scaler_skips_an_overflow() -> None:
    torch.manual_seed(0)
    model = _Normed(nn.LayerNorm(8))
    x, y = torch.randn(16, 6), torch.randn(16)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = JDSGD(model.parameters(), lr=0.05, batch_dim=0)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.float16):
            losses = (model(x).float() - y) ** 2
        optimizer.backward(scaler.scale(losses))
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    params = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    with torch.no_grad():
        model.head.weight.mul_(2.0**100)  # the losses themselves overflow
    step()
    with torch.no_grad():
        model.head.weight.div_(2.0**100)
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    step()
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def _nash_mtl_run(scaled: bool, tasks: bool) -> nn.Module:
    """Two NashMTL steps on per-instance losses (``tasks``: two task losses, as a list), through
    scaler.scale and scaler.step when ``scaled``."""
    model, inputs, targets = regression_problem(steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = JDSGD(
        model.parameters(), lr=0.1, weighting=NashMTLWeighting(), batch_dim=None if tasks else 0
    )
    for x, y in zip(inputs, targets, strict=True):
        optimizer.zero_grad()
        losses: Any = per_instance_losses(model, x, y)
        if tasks:
            losses = [losses[: len(losses) // 2].mean(), losses[len(losses) // 2 :].mean()]
        if scaled:
            optimizer.backward(scaler.scale(losses))
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.backward(losses)
            optimizer.step()
    return model


def test_backward_weighs_the_losses_a_grad_scaler_scaled_as_unscaled() -> None:
    """NashMTL's weights fall as the losses grow: weighing scaler.scale(losses) as given made the
    step 2^10 times too small once the scaler unscaled .grad. The optimizer recognises the scale in
    the losses' graph and weighs losses / s, as it does with grad_scaler=."""
    assert_same_params(_nash_mtl_run(True, False), _nash_mtl_run(False, False), atol=1e-6)


def test_a_list_of_task_losses_a_grad_scaler_scaled_is_weighed_unscaled() -> None:
    """scaler.scale([loss_a, loss_b]) scales each loss; the stacked losses' graph showed no scale,
    so NashMTL weighed the scaled losses and stepped 2^10 times too short."""
    assert_same_params(_nash_mtl_run(True, True), _nash_mtl_run(False, True), atol=1e-6)


def test_only_a_grad_scalers_kind_of_factor_is_taken_for_a_loss_scale() -> None:
    losses = torch.rand(4, requires_grad=True) + 1
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert grad_scaler_scale(scaler.scale(losses)) == 2.0**12
    assert grad_scaler_scale(losses * torch.tensor(2.0**12)) == 2.0**12  # indistinguishable
    assert grad_scaler_scale(losses * torch.tensor(3.0)) is None  # not a power of two
    assert grad_scaler_scale(losses * torch.tensor(0.5)) is None  # rather a loss weight
    assert grad_scaler_scale(losses * torch.tensor(2.0)) is None  # so is a small power of two
    assert grad_scaler_scale(losses * torch.tensor(128.0)) is None
    assert grad_scaler_scale(losses * 4.0) is None  # a Python number, not a scaler's tensor
    assert grad_scaler_scale(losses * torch.tensor(4.0, dtype=torch.float64)) is None
    assert grad_scaler_scale(losses * torch.tensor(4.0, requires_grad=True)) is None
    assert grad_scaler_scale(losses * torch.full((4,), 4.0)) is None
    assert grad_scaler_scale(losses.detach()) is None
    scaled = scaler.scale(losses)
    # Constant factors after the scale (Lightning multiplies per-instance losses back by the
    # accumulation) and a list scaled item by item: the scale below them is still the scaler's.
    assert grad_scaler_scale(scaled * 2) == 2.0**12
    assert grad_scaler_scale(scaled / 3.0 * torch.tensor(0.5)) == 2.0**12
    assert grad_scaler_scale(scaled / torch.tensor(2.0**12)) is None  # unscaled again
    assert grad_scaler_scale(scaler.scale([losses[0], losses[1]])) == 2.0**12
    assert grad_scaler_scale([scaled[0], losses[1]]) is None  # not scaled alike


def test_a_first_step_whose_losses_overflow_is_skipped_under_a_grad_scaler() -> None:
    """The scaler had no scale yet (scale() never ran), and its step() failed on the skip."""
    model, inputs, targets = regression_problem(steps=1)
    params = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler)
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]) * float("inf"))
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_step_refuses_a_non_finite_direction_without_a_scaler() -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]) * float("inf"))
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="GradScaler"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_a_non_finite_micro_batch_spoils_its_whole_accumulation_window() -> None:
    """A later finite micro-batch does not make a window with a non-finite one steppable (its
    .grad still holds the NaN); zero_grad() starts a clean window."""
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    x, y = inputs[0], targets[0]
    optimizer.backward(per_instance_losses(model, x[:4], y[:4]) * float("nan"))
    optimizer.backward(per_instance_losses(model, x[4:], y[4:]))
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="non-finite"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    optimizer.zero_grad()
    optimizer.backward(per_instance_losses(model, x[4:], y[4:]))
    optimizer.step()
    assert all(p.isfinite().all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def _discovering_optimizer() -> tuple[nn.Module, JDSGD, Tensor, set[int]]:
    """Until its first step, an optimizer watches forward passes with the engine's discovery hook
    (a global forward hook)."""
    table = nn.modules.module._global_forward_hooks
    before = set(table)
    model, inputs, _ = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    added = set(table) - before
    assert added
    return model, optimizer, inputs[0], added


def test_a_collected_optimizer_removes_its_global_hook() -> None:
    _, optimizer, _, added = _discovering_optimizer()
    del optimizer
    gc.collect()
    assert not added & set(nn.modules.module._global_forward_hooks)


def test_a_collection_during_a_compile_leaves_torchs_hook_table_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Collected while dynamo compiles a frame whose guards read the global hook table by key (a
    KeyError mid-compile was seen), the optimizer's hook goes inert and stays in the table until
    the compile is over."""
    _, optimizer, _, added = _discovering_optimizer()
    monkeypatch.setattr(global_hooks, "compiling", lambda: True)
    del optimizer
    gc.collect()
    assert added <= set(nn.modules.module._global_forward_hooks)
    monkeypatch.setattr(global_hooks, "compiling", lambda: False)
    global_hooks.remove_deferred_hooks()
    assert not added & set(nn.modules.module._global_forward_hooks)


def _module_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_a_collected_optimizer_takes_its_engines_hooks_off_the_model() -> None:
    """The engine's hooks on the layers hold the engine, not the optimizer: without a finalizer
    they stayed on the model, recording every forward pass, one more set per optimizer built."""
    model, inputs, targets = regression_problem(steps=1)
    for _ in range(3):
        optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
        assert _module_hooks(model) > 0
        del optimizer
        gc.collect()
        assert _module_hooks(model) == 0


def test_a_collection_during_a_compile_leaves_the_engines_hooks_inert_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    engine = optimizer._engine
    assert engine is not None
    monkeypatch.setattr(global_hooks, "compiling", lambda: True)
    del optimizer
    gc.collect()
    hooks = _module_hooks(model)
    assert hooks > 0 and engine.closed
    model(inputs[0])  # the hooks left until the compile ends record nothing
    assert engine._pending is None
    monkeypatch.setattr(global_hooks, "compiling", lambda: False)
    global_hooks.remove_deferred_hooks()
    assert _module_hooks(model) == 0


def test_torchs_global_step_hooks_run_once_per_step_with_the_jd_optimizer() -> None:
    """The wrapped optimizer's step is a torch optimizer's step: torch's global hooks ran for it
    too, twice per step of training, the second time with the wrapped optimizer."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model, inputs, targets = regression_problem(steps=1)
    calls: list[tuple[str, str]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__))),
    ]
    try:
        optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=0)
        own: list[str] = []
        optimizer.optimizer.register_step_post_hook(lambda o, a, k: own.append(type(o).__name__))
        optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
        optimizer.zero_grad()
        optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
        optimizer.step()
        assert calls == [("pre", "JDSGD"), ("post", "JDSGD")] * 2
        assert own == ["SGD", "SGD"]  # the wrapped optimizer's own hooks still run
    finally:
        for handle in handles:
            handle.remove()


def test_compiling_is_true_exactly_while_dynamo_compiles() -> None:
    seen: list[bool] = []

    def backend(graph: torch.fx.GraphModule, inputs: list[Tensor]) -> Any:
        seen.append(global_hooks.compiling())
        return graph.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x * 2, backend=backend)(torch.ones(2))
    assert seen == [True]
    assert not global_hooks.compiling()


def test_a_checkpoint_of_an_older_torch_loads_as_into_torchs_optimizer() -> None:
    """Adam's groups gained options over torch versions (decoupled_weight_decay...); torch's Adam
    completes them on loading, and so does the jdoptim optimizer now (it refused them)."""
    model, inputs, targets = regression_problem(steps=1)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    per_instance_losses(model, inputs[0], targets[0]).mean().backward()
    adam.step()
    saved = copy.deepcopy(adam.state_dict())
    for group in saved["param_groups"]:
        for key in ("decoupled_weight_decay", "fused", "differentiable", "capturable", "foreach"):
            group.pop(key, None)
    torch.optim.Adam(model.parameters(), lr=0.01).load_state_dict(copy.deepcopy(saved))
    optimizer = JDAdam(model.parameters(), lr=0.01, batch_dim=0)
    with pytest.warns(UserWarning, match="no 'jdoptim' entry"):  # torch's optimizer saved it
        optimizer.load_state_dict(copy.deepcopy(saved))
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is False
    with pytest.raises(ValueError, match="lacks"):  # another kind of optimizer: still refused
        JDSGD(model.parameters(), lr=0.01).load_state_dict(copy.deepcopy(saved))


def test_an_optimizer_without_the_differentiable_option_resumes_from_its_checkpoint() -> None:
    """A user's own Optimizer subclass (defaults without "differentiable", as torch's tutorials
    write it): checking the groups ran torch's __setstate__ on a copy that shared the defaults,
    which added "differentiable" to them, so every checkpoint looked saved by another optimizer."""

    class PlainSGD(torch.optim.Optimizer):
        def __init__(self, params: Any, lr: float = 0.1) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.add_(param.grad, alpha=-group["lr"])

    model, inputs, targets = regression_problem(steps=1)
    optimizer = JacobianDescent(
        PlainSGD(model.parameters()), weighting=UPGradWeighting(), batch_dim=0
    )
    optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = JacobianDescent(PlainSGD(model.parameters()), weighting=UPGradWeighting(), batch_dim=0)
    fresh.load_state_dict(copy.deepcopy(saved))
    fresh.load_state_dict(copy.deepcopy(saved))  # and again: nothing left changed by the check


def test_the_wrapped_optimizers_own_zero_grad_and_add_param_group_run() -> None:
    """An optimizer that completes its groups, or clears its own bookkeeping, in overrides of
    these methods: the jdoptim optimizer ran torch's base code instead, skipping them."""
    calls: list[str] = []

    class Custom(torch.optim.SGD):
        def add_param_group(self, param_group: dict[str, Any]) -> None:
            calls.append("add_param_group")
            param_group.setdefault("extra", 1)
            super().add_param_group(param_group)

        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append("zero_grad")
            super().zero_grad(set_to_none)

    first, second = nn.Linear(3, 1), nn.Linear(3, 1)
    inner = Custom(first.parameters(), lr=0.1)
    optimizer = JacobianDescent(inner, batch_dim=0)
    calls.clear()
    optimizer.add_param_group({"params": second.parameters()})
    optimizer.zero_grad()
    assert calls == ["add_param_group", "zero_grad"]
    assert optimizer.param_groups[-1]["extra"] == 1


def test_switching_between_methods_that_hold_nothing_keeps_the_wrapped_state() -> None:
    """Adam's moments saved with MeanWeighting load under UPGrad (neither holds state yet); a
    method that holds state still refuses another method's checkpoint, saying what to do."""
    model, inputs, targets = regression_problem(steps=1)
    mean = JDAdam(model.parameters(), lr=0.01, weighting=MeanWeighting(), batch_dim=0)
    mean.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    upgrad = JDAdam(model.parameters(), lr=0.01, weighting=UPGradWeighting(), batch_dim=0)
    upgrad.load_state_dict(copy.deepcopy(mean.state_dict()))
    torch.testing.assert_close(
        upgrad.state_dict()["state"], mean.state_dict()["state"], atol=0.0, rtol=0.0
    )
    ema = JDAdam(model.parameters(), lr=0.01, weighting=EMAWeighting(), batch_dim=0)
    ema.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    with pytest.raises(ValueError, match=r"optimizer\.optimizer\.load_state_dict"):
        JDAdam(model.parameters(), lr=0.01, weighting=MeanWeighting(), batch_dim=0).load_state_dict(
            copy.deepcopy(ema.state_dict())
        )


def test_the_wrapped_optimizers_own_state_dict_and_the_load_pre_hooks_order() -> None:
    """A wrapped optimizer's state_dict/load_state_dict overrides (state kept outside ``state``)
    and its own hooks run; this optimizer's load pre-hooks see the whole dict first, as torch
    runs them, so they can complete an older checkpoint or edit the 'jdoptim' entry."""

    class Counting(torch.optim.SGD):
        counter = 0

        def state_dict(self) -> dict[str, Any]:
            saved = super().state_dict()
            saved["counter"] = self.counter
            return saved

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            state_dict = dict(state_dict)
            self.counter = state_dict.pop("counter")
            super().load_state_dict(state_dict)

    model, inputs, targets = regression_problem(steps=1)
    source = Counting(model.parameters(), lr=0.1)
    source.counter = 3
    optimizer = JacobianDescent(source, batch_dim=0)
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["counter"] == 3 and saved["jdoptim"]["steps"] == 1

    seen: list[list[str]] = []

    def restart(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        seen.append(sorted(state_dict))
        state_dict["jdoptim"]["steps"] = 0
        return state_dict

    target = JacobianDescent(Counting(model.parameters(), lr=0.1), batch_dim=0)
    target.register_load_state_dict_pre_hook(restart)
    target.load_state_dict(saved)
    assert seen == [["counter", "jdoptim", "param_groups", "state"]]
    assert target.optimizer.counter == 3 and target.jd_state_dict()["steps"] == 0


def test_load_pre_hooks_edit_a_copy_of_the_callers_dict_as_in_torch() -> None:
    """torch shallow-copies the state dict before its load pre-hooks: a hook that drops or replaces
    an entry leaves the caller's dict (which may be loaded again) as it was."""

    def dropping(opt: Any, state_dict: dict[str, Any]) -> None:
        state_dict.pop("jdoptim", None)
        state_dict["extra"] = 1

    model, inputs, targets = regression_problem(steps=1)
    optimizer = JDSGD(model.parameters(), lr=0.1, momentum=0.9, batch_dim=0)
    optimizer.step(lambda: per_instance_losses(model, inputs[0], targets[0]))
    saved = optimizer.state_dict()
    keys = sorted(saved)
    for target in (
        JDSGD(model.parameters(), lr=0.1, momentum=0.9, batch_dim=0),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    ):
        target.register_load_state_dict_pre_hook(dropping)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the JD one warns that its method state is missing
            target.load_state_dict(saved)
        assert sorted(saved) == keys, type(target).__name__


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("form", ["closure", "backward"])
def test_grad_has_the_parameters_layout_as_autograd_gives_it(
    batch_dim: int | None, form: str
) -> None:
    """A channels_last convolution weight: jdoptim wrote a contiguous .grad, fused optimizers read
    it in the parameter's layout, and the update went to the wrong entries. Checked against torch's
    fused SGD on the mean loss (MeanWeighting is its step)."""
    torch.manual_seed(0)
    inputs = torch.randn(6, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    targets = torch.randn(6, dtype=torch.float64)

    def network() -> nn.Module:
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 1))
        return layers.to(dtype=torch.float64, memory_format=torch.channels_last)

    def losses_of(model: nn.Module) -> Tensor:
        return (model(inputs).squeeze(-1) - targets) ** 2

    reference, model = network(), network()
    torch_sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True)
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        fused=True,
        weighting=MeanWeighting(),
        batch_dim=batch_dim,
    )
    for _ in range(3):
        torch_sgd.zero_grad()
        losses_of(reference).mean().backward()
        torch_sgd.step()
        if form == "closure":
            optimizer.step(lambda: (optimizer.zero_grad(), losses_of(model))[1])
        else:
            optimizer.zero_grad()
            optimizer.backward(losses_of(model))
            optimizer.step()
    conv = model[0].weight
    assert conv.grad is not None and conv.grad.stride() == conv.stride()
    assert_same_params(model, reference, atol=1e-12)


def test_engine_backward_gives_grad_the_parameters_layout() -> None:
    layer = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    inputs = torch.randn(5, 3, 6, 6).to(memory_format=torch.channels_last)
    with Engine(layer, batch_dim=0) as engine:
        output = layer(inputs).sum(dim=(1, 2, 3))
        engine.compute_gramian(output)
        engine.backward(torch.ones(5))
    assert layer.weight.grad is not None and layer.weight.grad.stride() == layer.weight.stride()


@pytest.mark.parametrize("form", ["closure", "closure zeroed before", "backward"])
def test_zero_grad_keeping_tensors_lets_momentum_move_a_parameter_the_losses_skip(
    form: str,
) -> None:
    """zero_grad(set_to_none=False) leaves zero tensors; torch's SGD then still applies momentum
    and weight decay to a parameter the step's losses do not reach. step(closure) cleared them to
    None, so that parameter stopped (in the closure or just before the step)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64)

    def build() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(1)
        return nn.Linear(3, 1).double(), nn.Linear(3, 1).double()  # the head: first step only

    def losses(body: nn.Module, head: nn.Module, step: int) -> Tensor:
        out = body(x).squeeze(-1) + (head(x).squeeze(-1) if step == 0 else 0.0)
        return (out - y) ** 2

    (body_t, head_t), (body, head) = build(), build()
    options: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
    reference = torch.optim.SGD([*body_t.parameters(), *head_t.parameters()], **options)
    optimizer = JDSGD(
        [*body.parameters(), *head.parameters()],
        weighting=MeanWeighting(),
        batch_dim=0,
        **options,
    )
    for step in range(3):
        reference.zero_grad(set_to_none=False)
        losses(body_t, head_t, step).mean().backward()
        reference.step()
        if form == "closure":

            def closure(step: int = step) -> Tensor:
                optimizer.zero_grad(set_to_none=False)
                return losses(body, head, step)

            optimizer.step(closure)
        elif form == "closure zeroed before":
            optimizer.zero_grad(set_to_none=False)
            optimizer.step(lambda step=step: losses(body, head, step))
        else:
            optimizer.zero_grad(set_to_none=False)
            optimizer.backward(losses(body, head, step))
            optimizer.step()
    assert_same_params(head, head_t, atol=1e-12)
    assert_same_params(body, body_t, atol=1e-12)


def test_a_group_outside_the_given_modules_is_refused_as_at_construction() -> None:
    """With modules=, the engine watches only those modules: a group added for another module's
    parameters never got a .grad, silently (construction raises for the same parameters)."""
    body, head = nn.Linear(3, 5), nn.Linear(5, 1)
    optimizer = JDSGD(body.parameters(), lr=0.1, batch_dim=0, modules=body)
    with pytest.raises(ValueError, match="modules= does not own 2"):
        optimizer.add_param_group({"params": head.parameters()})
    assert len(optimizer.param_groups) == 1  # nothing changed
    optimizer.add_param_group({"params": [], "lr": 0.01})  # within the modules: fine
    assert len(optimizer.param_groups) == 2


def test_jdadam_takes_torchs_decoupled_weight_decay() -> None:
    model, inputs, targets = regression_problem(steps=2)
    reference = copy.deepcopy(model)
    options: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}
    adam = torch.optim.Adam(reference.parameters(), **options)
    optimizer = JDAdam(model.parameters(), weighting=MeanWeighting(), batch_dim=0, **options)
    for x, y in zip(inputs, targets, strict=True):
        adam.zero_grad()
        per_instance_losses(reference, x, y).mean().backward()
        adam.step()
        optimizer.zero_grad()
        optimizer.backward(per_instance_losses(model, x, y))
        optimizer.step()
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is True
    assert_same_params(model, reference, atol=1e-6)


def test_bfloat16_parameters_on_the_exact_route_step_as_on_the_engines() -> None:
    """batch_dim=None formed the Gramian of bfloat16 rows in bfloat16, where it is not positive
    semi-definite even to its own precision: UPGrad raised after a few steps at B = 32."""
    results = []
    for batch_dim in (None, 0):
        torch.manual_seed(0)
        x, y = torch.randn(32, 5, dtype=torch.bfloat16), torch.randn(32, dtype=torch.bfloat16)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(torch.bfloat16)
        optimizer = JDSGD(model.parameters(), lr=0.01, batch_dim=batch_dim)
        for _ in range(10):
            optimizer.step(lambda: (model(x).squeeze(-1) - y) ** 2)
        results.append(torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], atol=2e-2, rtol=0.0)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("form", ["closure", "backward"])
def test_parameter_gradient_hooks_run_as_in_a_backward_pass(
    batch_dim: int | None, form: str
) -> None:
    """A pruning mask by p.register_hook was skipped on the engine's routes (the masked entries
    moved, and UPGrad weighed unmasked gradients); post-accumulate-grad hooks never ran. Now the
    masked Jacobian is the one weighed, and each hook runs once per step on the final .grad."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    mask = (torch.rand(7, 5) > 0.5).double()
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    model[0].weight.register_hook(lambda grad: grad * mask)
    seen: list[Tensor] = []
    model[2].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))

    def losses() -> Tensor:
        return (model(x).squeeze(-1) - y) ** 2

    params = list(model.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses()
        ]
    )
    direction = UPGradWeighting()(jacobian @ jacobian.T) @ jacobian
    optimizer = JDSGD(params, lr=0.0, weighting=UPGradWeighting(), batch_dim=batch_dim)
    if form == "closure":
        optimizer.step(losses)
    else:
        optimizer.backward(losses())
        optimizer.step()
    grad = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(grad, direction, atol=1e-10, rtol=0.0)
    assert model[0].weight.grad is not None and not bool((model[0].weight.grad * (1 - mask)).any())
    assert len(seen) == 1 and torch.equal(seen[0], model[2].weight.grad)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_backward_and_step_work_under_no_grad_and_inference_mode(batch_dim: int | None) -> None:
    """torch's loss.backward() runs under no_grad and inference_mode; the exact route's Jacobian
    raised under no_grad (a view without grad_fn), and a .grad left by a backward run in
    inference mode (which has no version counter) broke the next optimizer.backward."""
    model, inputs, targets = regression_problem(steps=1)
    reference = copy.deepcopy(model)
    x, y = inputs[0], targets[0]
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=batch_dim)
    expected = JDSGD(
        reference.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=batch_dim
    )
    with torch.no_grad():
        optimizer.step(lambda: per_instance_losses(model, x, y))
    expected.step(lambda: per_instance_losses(reference, x, y))
    assert_same_params(model, reference, atol=1e-12)
    losses = per_instance_losses(model, x, y)
    with torch.inference_mode():
        losses.backward(torch.ones_like(losses))  # .grad becomes an inference tensor
    optimizer.zero_grad()
    losses = per_instance_losses(model, x, y)
    with torch.no_grad():
        optimizer.backward(losses)
    more = per_instance_losses(model, x, y)
    with torch.inference_mode():
        optimizer.backward(more)
    assert optimizer.last_step is not None
    # One window of both backwards: concatenated per instance, summed per task.
    assert optimizer.last_step.losses.shape == ((2 * len(x),) if batch_dim == 0 else (len(x),))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_losses_that_reach_no_parameter_get_the_optimizers_words(batch_dim: int | None) -> None:
    """The error named the Engine, engine.capture() or autojac's inputs=, none of which a user of
    the optimizer wrote."""
    model, inputs, targets = regression_problem(steps=1)
    other = nn.Linear(inputs[0].shape[1], 1).double()
    optimizer = JDSGD(model.parameters(), lr=0.1, batch_dim=batch_dim)
    with pytest.raises(ValueError, match="do not depend on any of the optimizer's parameters"):
        optimizer.backward(per_instance_losses(other, inputs[0], targets[0]))
    with pytest.raises(ValueError, match="do not depend on any of the optimizer's parameters"):
        optimizer.step(lambda: per_instance_losses(other, inputs[0], targets[0]))


def test_a_parameter_listed_twice_counts_once() -> None:
    """torch only warns about a duplicated parameter; the exact route's Jacobian held its columns
    twice, so the Gramian (and UPGrad's weights) counted its gradient twice. (torch's SGD then
    updates it twice: the direction is compared, not the parameters.)"""
    grads = []
    for duplicated in (False, True):
        model, inputs, targets = regression_problem(steps=1)
        params = list(model.parameters())
        if duplicated:
            params = [*params, params[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warning about the duplicate
            optimizer = JDSGD(params, lr=0.1, weighting=UPGradWeighting())
        optimizer.backward(per_instance_losses(model, inputs[0], targets[0]))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))  # type: ignore[union-attr]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=0.0)


def test_a_grad_scaler_that_backs_off_below_2_to_the_8_is_followed() -> None:
    """Below 2^8 a lone power of two is taken for a loss weight, not a scale; a scaler recognised
    at 2^9 that then backs off to 2^8 and 2^7 (overflows) must still be divided out: NashMTL
    stepped 128 times too short at 2^7."""
    results = []
    for scaled in (False, True):
        model, inputs, targets = regression_problem(steps=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**9)
        optimizer = JDSGD(model.parameters(), lr=0.1, weighting=NashMTLWeighting(), batch_dim=0)
        for step, (x, y) in enumerate(zip(inputs, targets, strict=True)):
            optimizer.zero_grad()
            losses = per_instance_losses(model, x, y)
            if scaled:
                optimizer.backward(scaler.scale(losses))
                scaler.step(optimizer)
                scaler.update(2.0 ** (8 - step))  # as two overflows in a row would
            else:
                optimizer.backward(losses)
                optimizer.step()
        results.append((model, optimizer))
    assert_same_params(results[1][0], results[0][0], atol=1e-6)
    saved = results[1][1].state_dict()
    assert saved["jdoptim"]["loss_scale_seen"] == 2.0**7  # a resumed run goes on following it


def test_a_method_built_with_other_inner_methods_is_refused_with_a_clear_error() -> None:
    """CR-MOGM around UPGrad, loaded into CR-MOGM around MGDA: torch's raw RuntimeError about
    unexpected keys (other mismatches get a ValueError naming the methods)."""
    model, inputs, targets = regression_problem(steps=2)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=CRMOGMWeighting(UPGradWeighting()))
    for x, y in zip(inputs, targets, strict=True):
        optimizer.step(lambda x=x, y=y: per_instance_losses(model, x, y))
    other = JDSGD(model.parameters(), lr=0.1, weighting=CRMOGMWeighting(MGDAWeighting()))
    with pytest.raises(ValueError, match="does not fit this optimizer's CRMOGMWeighting"):
        other.load_state_dict(optimizer.state_dict())
