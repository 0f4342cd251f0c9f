"""Lightning's own Trainer drives jdoptim optimizers through ``JacobianDescentModule``.

Each run is compared with Jacobian descent written by hand in the order Lightning runs it
(bit-identical), and with the plain backward-then-step loop on the whole batch (to 1e-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from jdoptim.aggregation import ConFIG, NashMTLWeighting, UPGradWeighting
from jdoptim.optim import JDSGD, JacobianDescent, JDAdam
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
from tests.optim._models import EMAWeighting

pl = pytest.importorskip(
    "lightning.pytorch", reason="PyTorch Lightning is not installed: pip install jdoptim[lightning]"
)
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from jdoptim.integrations.lightning import JacobianDescentModule  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:.*LeafSpec.*is deprecated",
    "ignore:.*callbacks used to create the checkpoint",
)
STEPS = 4


def sgd(net: nn.Module, batch_dim: int | None) -> JDSGD:
    return JDSGD(net.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=batch_dim)


class Regression(JacobianDescentModule):
    def __init__(
        self, net: nn.Module, loss_fn: LossFn = instance_losses, batch_dim: int | None = 0
    ):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.batch_dim = batch_dim

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        losses = self.loss_fn(self.net, *batch)
        self.log("mean_loss", losses.mean())
        return losses

    def configure_optimizers(self) -> Any:
        return sgd(self.net, self.batch_dim)


def fit(module: pl.LightningModule, data: tuple[Tensor, Tensor], **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    ckpt_path = options.pop("ckpt_path", None)
    trainer = pl.Trainer(**{**settings, **options})
    trainer.fit(module, loader(*data), ckpt_path=ckpt_path)
    return trainer


def trainer_order_loop(
    net: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    loss_fn: LossFn = instance_losses,
    batch_dim: int | None = 0,
    accumulate: int = 1,
    clip: float | None = None,
    autocast: torch.dtype | None = None,
) -> JDSGD:
    """Hand-written Jacobian descent in Lightning's order: per micro-batch the forward, zero_grad
    (first micro-batch), backward (per-task losses divided by the accumulation count); clipping and
    the update after the last one, which runs inside ``step(closure)`` as Lightning's closure does."""
    optimizer = sgd(net, batch_dim)
    stream = batches(*data)
    for _ in range(STEPS):
        for index in range(accumulate):
            x, y = next(stream)
            last = index == accumulate - 1

            def closure() -> Tensor:
                with torch.autocast(
                    "cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)
                ):
                    losses = loss_fn(net, x, y)
                if index == 0:
                    optimizer.zero_grad()
                optimizer.backward(losses if batch_dim is not None else losses / accumulate)
                if clip is not None and last:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                return losses.detach()

            if last:
                optimizer.step(closure)
            else:
                closure()
    return optimizer


def whole_batch_loop(
    net: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    loss_fn: LossFn = instance_losses,
    batch_dim: int | None = 0,
    accumulate: int = 1,
    clip: float | None = None,
) -> None:
    """The plain backward-then-step loop, one backward on the concatenated micro-batches."""
    optimizer = sgd(net, batch_dim)
    stream = batches(*data, size=BATCH * accumulate)
    for _ in range(STEPS):
        optimizer.zero_grad()
        optimizer.backward(loss_fn(net, *next(stream)))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()


CASES = {
    "plain": ({}, {}),
    "gradient_clip_val": ({"gradient_clip_val": 0.05}, {"clip": 0.05}),
    "accumulate_grad_batches": ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {"autocast": torch.bfloat16}),
}


@pytest.mark.parametrize("case", CASES)
def test_automatic_optimization_equals_the_hand_written_loop(case: str) -> None:
    trainer_options, loop_options = CASES[case]
    data = make_data()
    module = Regression(make_net())
    fit(module, data, **trainer_options)

    by_hand = make_net()
    trainer_order_loop(by_hand, data, **loop_options)
    assert max_difference(module.net, by_hand) == 0.0
    if case != "bf16-mixed":  # bfloat16 rounds differently when the forward runs in one batch
        whole_batch = make_net()
        whole_batch_loop(whole_batch, data, **{k: v for k, v in loop_options.items()})
        assert max_difference(module.net, whole_batch) <= 1e-6
    if case != "plain":  # the option changed the training: it did not silently do nothing
        unchanged = make_net()
        trainer_order_loop(unchanged, data)
        assert max_difference(module.net, unchanged) > 1e-4


def test_accumulation_of_per_task_losses_equals_the_whole_batch_step() -> None:
    data = make_data(outputs=2)
    module = Regression(make_net(outputs=2), loss_fn=task_losses, batch_dim=None)
    fit(module, data, accumulate_grad_batches=2)

    options: dict[str, Any] = {"loss_fn": task_losses, "batch_dim": None, "accumulate": 2}
    by_hand = make_net(outputs=2)
    trainer_order_loop(by_hand, data, **options)
    assert max_difference(module.net, by_hand) == 0.0
    whole_batch = make_net(outputs=2)
    whole_batch_loop(whole_batch, data, **options)
    assert max_difference(module.net, whole_batch) <= 1e-6


class ScalerAwareRegression(Regression):
    """Hands the precision plugin's GradScaler to the optimizer (exact Gramian scaling)."""

    def configure_optimizers(self) -> Any:
        scaler = self.trainer.precision_plugin.scaler
        return JDSGD(self.net.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler)


def fp16_plugin() -> MixedPrecision:
    # Lightning turns "16-mixed" into "bf16-mixed" on CPU; its MixedPrecision plugin with a CPU
    # GradScaler runs the same scale / backward / unscale_ / clip / scaler.step sequence as on CUDA.
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))


def scaled_loop(
    net: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    loss_fn: LossFn = instance_losses,
    method: dict[str, Any] | None = None,
    clip: float | None = None,
    scaler_in_optimizer: bool = False,
) -> torch.amp.GradScaler:
    """Hand-written float16 training with a GradScaler, in the precision plugin's order."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = JDSGD(
        net.parameters(),
        lr=0.1,
        **(method or {"weighting": UPGradWeighting(), "batch_dim": 0}),
        grad_scaler=scaler if scaler_in_optimizer else None,
    )
    stream = batches(*data)
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16):
            losses = loss_fn(net, *next(stream))
        optimizer.zero_grad()
        optimizer.backward(scaler.scale(losses))
        scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
    return scaler


@pytest.mark.parametrize("scaler_in_optimizer", [False, True], ids=["plain", "grad_scaler="])
def test_float16_loss_scaling_through_lightning_mixed_precision_plugin(
    scaler_in_optimizer: bool,
) -> None:
    data = make_data()
    plugin = fp16_plugin()
    module = (ScalerAwareRegression if scaler_in_optimizer else Regression)(make_net())
    fit(module, data, plugins=[plugin], gradient_clip_val=0.05)

    net = make_net()
    scaler = scaled_loop(net, data, clip=0.05, scaler_in_optimizer=scaler_in_optimizer)
    assert max_difference(module.net, net) == 0.0
    assert plugin.scaler is not None and plugin.scaler.get_scale() == scaler.get_scale() == 2.0**10
    assert max_difference(net, make_net()) > 1e-3  # the steps were taken


class NashMTLRegression(Regression):
    def configure_optimizers(self) -> Any:
        return JDSGD(self.net.parameters(), lr=0.1, weighting=NashMTLWeighting(), batch_dim=0)


def test_float16_loss_scaling_leaves_a_scale_dependent_weighting_unchanged() -> None:
    """NashMTL's weights depend on the losses' scale; the plugin scales them before backward. The
    optimizer recognises the scaled losses and weighs them unscaled, as if given the scaler (the
    step was 2^10 times too short)."""
    data = make_data()
    module = NashMTLRegression(make_net())
    fit(module, data, plugins=[fp16_plugin()])

    net = make_net()
    method = {"weighting": NashMTLWeighting(), "batch_dim": 0}
    scaled_loop(net, data, method=method, scaler_in_optimizer=True)
    assert max_difference(module.net, net) == 0.0
    assert max_difference(net, make_net()) > 1e-3


class ManualRegression(Regression):
    def __init__(
        self, net: nn.Module, loss_fn: LossFn = instance_losses, batch_dim: int | None = 0
    ) -> None:
        super().__init__(net, loss_fn, batch_dim)
        self.automatic_optimization = False
        self.seen: list[tuple[float, int, bool]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        assert isinstance(optimizer, JacobianDescent)
        self.toggle_optimizer(optimizer)
        trainable = all(p.requires_grad for p in self.net.parameters())
        self.seen.append((optimizer.param_groups[0]["lr"], len(optimizer.state), trainable))

        def closure() -> Tensor:
            losses = self.loss_fn(self.net, *batch)
            optimizer.zero_grad()
            self.manual_backward(losses)
            return losses

        optimizer.step(closure)
        self.untoggle_optimizer(optimizer)


MANUAL_CASES = {
    "32-true": ("32-true", "instance-wise"),
    "bf16-mixed": ("bf16-mixed", "instance-wise"),
    "16-mixed": ("16-mixed", "instance-wise"),
    "16-mixed-per-task": ("16-mixed", "per-task"),
    "16-mixed-ConFIG": ("16-mixed", "ConFIG"),  # a Jacobian-path method
}


class ManualConFIG(ManualRegression):
    def configure_optimizers(self) -> Any:
        return JDSGD(self.net.parameters(), lr=0.1, aggregator=ConFIG())


@pytest.mark.parametrize("case", MANUAL_CASES)
def test_manual_optimization_equals_the_hand_written_loop(case: str) -> None:
    # A manual training_step runs whole under the precision plugin's autocast, backward included.
    precision, kind = MANUAL_CASES[case]
    outputs, loss_fn = (2, task_losses) if kind == "per-task" else (1, instance_losses)
    method: dict[str, Any] = {
        "instance-wise": {"weighting": UPGradWeighting(), "batch_dim": 0},
        "per-task": {"weighting": UPGradWeighting(), "batch_dim": None},
        "ConFIG": {"aggregator": ConFIG()},
    }[kind]
    data = make_data(outputs=outputs)
    manual_class = ManualConFIG if kind == "ConFIG" else ManualRegression
    module = manual_class(make_net(outputs), loss_fn, method.get("batch_dim"))
    by_hand = make_net(outputs)
    if precision == "16-mixed":
        plugin = fp16_plugin()
        fit(module, data, plugins=[plugin])
        scaler = scaled_loop(by_hand, data, loss_fn=loss_fn, method=method)
        assert plugin.scaler is not None and plugin.scaler.get_scale() == scaler.get_scale()
    else:
        fit(module, data, precision=precision)
        autocast = torch.bfloat16 if precision == "bf16-mixed" else None
        trainer_order_loop(by_hand, data, autocast=autocast)
    assert max_difference(module.net, by_hand) == 0.0
    assert max_difference(by_hand, make_net(outputs)) > 1e-3
    assert module.seen == [(0.1, 0, True)] * STEPS
    assert all(p.requires_grad for p in module.net.parameters())


class PlainManualRegression(Regression):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(instance_losses(self.net, *batch))
        optimizer.step()


def test_manual_optimization_with_a_plain_step_call() -> None:
    data = make_data()
    module = PlainManualRegression(make_net())
    fit(module, data)
    by_hand = make_net()
    trainer_order_loop(by_hand, data)
    assert max_difference(module.net, by_hand) <= 1e-6


class StatefulRegression(Regression):
    """Adam (moment state), a stateful weighting and a scheduler: everything a checkpoint holds."""

    def configure_optimizers(self) -> Any:
        optimizer = JDAdam(self.net.parameters(), lr=0.01, weighting=EMAWeighting(), batch_dim=0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def test_resuming_from_a_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    data = make_data(size=2 * BATCH)
    straight = StatefulRegression(make_net())
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=STEPS // 2, save_top_k=-1)
    straight_trainer = fit(straight, data, enable_checkpointing=True, callbacks=[saver])

    resumed = StatefulRegression(make_net(seed=7))
    halfway = tmp_path / f"epoch=0-step={STEPS // 2}.ckpt"
    resumed_trainer = fit(resumed, data, ckpt_path=halfway)

    assert max_difference(resumed.net, straight.net) == 0.0
    saved, restored = (t.optimizers[0].state_dict() for t in (straight_trainer, resumed_trainer))
    assert restored["jdoptim"]["steps"] == saved["jdoptim"]["steps"] == STEPS
    assert_same_state(restored["jdoptim"]["method"], saved["jdoptim"]["method"])
    assert_same_state(restored["state"], saved["state"])
    assert restored["param_groups"] == saved["param_groups"]


def assert_same_state(a: Any, b: Any) -> None:
    """Nested state (dicts, lists, tensors, plain values) equal, tensors bit for bit."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


class ScheduledRegression(Regression):
    def configure_optimizers(self) -> Any:
        optimizer = sgd(self.net, 0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_learning_rate_monitor_scheduler_and_logged_losses() -> None:
    data = make_data()
    module = ScheduledRegression(make_net())
    logger = MemoryLogger()
    monitor = LearningRateMonitor(logging_interval="step")
    fit(module, data, logger=logger, callbacks=[monitor], log_every_n_steps=1)

    rates = [m["lr-JDSGD"] for m in logger.metrics if "lr-JDSGD" in m]
    assert rates == pytest.approx([0.1 * 0.5**k for k in range(STEPS)])
    logged = [m["mean_loss"] for m in logger.metrics if "mean_loss" in m]
    net = make_net()
    optimizer = sgd(net, 0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    expected = []
    for _, batch in zip(range(STEPS), batches(*data), strict=False):
        optimizer.zero_grad()
        losses = instance_losses(net, *batch)
        expected.append(losses.mean().item())
        optimizer.backward(losses)
        optimizer.step()
        scheduler.step()
    assert logged == pytest.approx(expected, abs=1e-6)
    assert max_difference(module.net, net) <= 1e-6


class TwoTasks(JacobianDescentModule):
    """A shared trunk and one head per task; multi-task mode through manual_backward(features=)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trunk, self.heads = two_task_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()

        def closure() -> Tensor:
            losses, features = two_task_losses(self.trunk, self.heads, *batch)
            optimizer.zero_grad()
            self.manual_backward(losses, features=features)
            return losses

        optimizer.step(closure)

    def configure_optimizers(self) -> Any:
        return two_task_optimizer(self.trunk, self.heads)


def two_task_net() -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.ModuleList(
        [nn.Linear(4, 1), nn.Linear(4, 1)]
    )


def two_task_losses(
    trunk: nn.Module, heads: nn.ModuleList, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    features = trunk(x)
    outputs = torch.cat([head(features) for head in heads], dim=1)
    return ((outputs - y) ** 2).mean(dim=0), features


def two_task_optimizer(trunk: nn.Module, heads: nn.ModuleList) -> JDSGD:
    params = [*trunk.parameters(), *heads.parameters()]
    return JDSGD(params, lr=0.1, weighting=UPGradWeighting(), shared_params=trunk.parameters())


def test_multi_task_mode_through_manual_backward_features() -> None:
    data = make_data(outputs=2)
    module = TwoTasks()
    fit(module, data)

    trunk, heads = two_task_net()
    optimizer = two_task_optimizer(trunk, heads)
    for _, (x, y) in zip(range(STEPS), batches(*data), strict=False):

        def closure() -> Tensor:
            losses, features = two_task_losses(trunk, heads, x, y)
            optimizer.zero_grad()
            optimizer.backward(losses, features=features)
            return losses

        optimizer.step(closure)
    assert max_difference(module.trunk, trunk) == 0.0
    assert max_difference(module.heads, heads) == 0.0
    assert max_difference(trunk, two_task_net()[0]) > 1e-3


class TwoOptimizers(JacobianDescentModule):
    """Two jdoptim optimizers, one per half of the model (GAN-style manual optimization)."""

    def __init__(self, choose: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.choose = choose
        self.first, self.second = make_net(), make_net(seed=1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        for optimizer, net in zip(self.optimizers(), (self.first, self.second), strict=True):

            def closure(optimizer: Any = optimizer, net: nn.Module = net) -> Tensor:
                losses = instance_losses(net, *batch)
                optimizer.zero_grad()
                chosen = {"jd_optimizer": optimizer} if self.choose else {}
                self.manual_backward(losses, **chosen)
                return losses

            optimizer.step(closure)

    def configure_optimizers(self) -> Any:
        return sgd(self.first, 0), sgd(self.second, 0)


def test_several_jdoptim_optimizers_are_told_apart_by_jd_optimizer() -> None:
    data = make_data()
    module = TwoOptimizers(choose=True)
    fit(module, data, max_steps=2 * STEPS)  # Lightning counts the steps of both optimizers
    first, second = make_net(), make_net(seed=1)
    trainer_order_loop(first, data)
    trainer_order_loop(second, data)
    assert max_difference(module.first, first) == 0.0
    assert max_difference(module.second, second) == 0.0

    with pytest.raises(TypeError, match="jd_optimizer=opt"):
        fit(TwoOptimizers(choose=False), data)


class ScalerInOptimizerNashMTL(Regression):
    def configure_optimizers(self) -> Any:
        scaler = self.trainer.precision_plugin.scaler
        return JDSGD(
            self.net.parameters(),
            lr=0.1,
            weighting=NashMTLWeighting(),
            batch_dim=0,
            grad_scaler=scaler,
        )


def test_float16_loss_scaling_with_accumulation_leaves_a_scale_dependent_weighting_unchanged() -> (
    None
):
    """With accumulate_grad_batches, the module multiplies the plugin's scaled per-instance losses
    back by the accumulation count: the scale was no longer found in their graph, so NashMTL
    weighed scaled losses and stepped 2^10 times too short. Same steps as with the plugin's scaler
    handed to the optimizer."""
    data = make_data()
    recognised = NashMTLRegression(make_net())
    fit(recognised, data, plugins=[fp16_plugin()], accumulate_grad_batches=2)
    given = ScalerInOptimizerNashMTL(make_net())
    fit(given, data, plugins=[fp16_plugin()], accumulate_grad_batches=2)
    assert max_difference(recognised.net, given.net) <= 1e-6
    assert max_difference(given.net, make_net()) > 1e-3


class BesidePlainOptimizer(JacobianDescentModule):
    """A jdoptim optimizer for one network and torch's SGD for another (GAN-style manual
    optimization); the plain one's scalar loss goes through self.manual_backward too."""

    def __init__(self, toggle: bool, weighted: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.weighted = weighted  # the plain loss per instance, with backward's gradient argument
        self.first, self.second = make_net(), make_net(seed=1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        jd, plain = self.optimizers()
        jd.zero_grad()
        self.manual_backward(instance_losses(self.first, *batch))
        jd.step()
        if self.toggle:
            self.toggle_optimizer(plain)
        plain.zero_grad()
        losses = instance_losses(self.second, *batch)
        if self.weighted:  # a non-scalar loss that reaches only the plain optimizer's network
            self.manual_backward(losses, torch.full_like(losses, 1 / len(losses)))
        else:
            self.manual_backward(losses.mean())
        plain.step()
        if self.toggle:
            self.untoggle_optimizer(plain)

    def configure_optimizers(self) -> Any:
        return sgd(self.first, 0), torch.optim.SGD(self.second.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("toggle", "weighted"),
    [(False, False), (True, False), (False, True)],
    ids=["plain", "toggle_optimizer", "non-scalar"],
)
def test_a_plain_optimizers_loss_takes_lightnings_backward(toggle: bool, weighted: bool) -> None:
    """The scalar loss of the plain optimizer went to the jdoptim optimizer (the only one), so the
    plain one never got .grad (or, toggled, the backward raised); a non-scalar one that reaches
    none of the jdoptim optimizer's parameters raised that the losses reach none of them."""
    data = make_data()
    module = BesidePlainOptimizer(toggle, weighted)
    fit(module, data, max_steps=2 * STEPS)
    first, second = make_net(), make_net(seed=1)
    jd, plain = sgd(first, 0), torch.optim.SGD(second.parameters(), lr=0.1)
    stream = batches(*data)
    for _ in range(STEPS):
        x, y = next(stream)
        jd.zero_grad()
        jd.backward(instance_losses(first, x, y))
        jd.step()
        plain.zero_grad()
        instance_losses(second, x, y).mean().backward()
        plain.step()
    assert max_difference(module.first, first) == 0.0
    assert max_difference(module.second, second) == 0.0
    assert max_difference(second, make_net(seed=1)) > 1e-3


class ListOfTaskLosses(JacobianDescentModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        losses = instance_losses(self.net, *batch)
        optimizer.zero_grad()
        self.manual_backward([losses[: BATCH // 2].mean(), losses[BATCH // 2 :].mean()])
        optimizer.step()

    def configure_optimizers(self) -> Any:
        return sgd(self.net, None)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_backward_takes_per_task_losses_as_a_list(precision: str) -> None:
    data = make_data()
    module = ListOfTaskLosses()
    fit(module, data, precision=precision)
    net = make_net()
    optimizer = sgd(net, None)
    stream = batches(*data)
    for _ in range(STEPS):
        x, y = next(stream)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            losses = instance_losses(net, x, y)
        optimizer.zero_grad()
        optimizer.backward(torch.stack([losses[: BATCH // 2].mean(), losses[BATCH // 2 :].mean()]))
        optimizer.step()
    assert max_difference(module.net, net) == 0.0
