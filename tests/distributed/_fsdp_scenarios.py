"""What each rank runs in the ``fully_shard`` tests (module-level, so spawned processes import it).

As in ``_scenarios.py``, the global batches come from a fixed seed and rank ``r`` takes its
slice; the parameters a rank returns are the full tensors (its shards gathered), so they compare
with a single-process run on the concatenated batches.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from jdoptim import JDSGD, JDAdam
from jdoptim.aggregation import ExcessMTLWeighting, GradDrop, TrimmedMean, UPGradWeighting
from jdoptim.distributed import checkpoint_state, load_checkpoint_state
from jdoptim.scalarization import UW, GeometricMean
from tests.distributed._scenarios import (
    broken_on_rank_1,
    iwrm_batches,
    iwrm_losses,
    iwrm_model,
    mtl_batches,
    mtl_model,
    overflow_history,
    slices,
    train_tasks,
)
from tests.optim._models import EMAWeighting

STEPS = 3


def shard(model: nn.Module, layers: list[nn.Module]) -> nn.Module:
    """The usual recipe: ``fully_shard`` each layer, then the root."""
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> list[Tensor]:
    """Every parameter as a full tensor (sharded ones gathered)."""
    return [
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def train_iwrm(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice, how: str = "closure"
) -> Tensor:
    """``how``: "closure" (step(closure)), "modules" (modules=model), "backward"
    (backward-then-step, the forward outside the optimizer), "accumulate" (backward-then-step on
    two halves of the batch) or "scalar" (the mean loss)."""
    options: dict[str, Any] = {"modules": model} if how == "modules" else {}
    optimizer = JDSGD(
        model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0, **options
    )
    losses = torch.empty(0)
    for x, y in batches:
        if how == "accumulate":
            xs, ys = x[part], y[part]
            half = len(xs) // 2
            optimizer.backward(iwrm_losses(model, xs[:half], ys[:half]))
            optimizer.backward(iwrm_losses(model, xs[half:], ys[half:]))
            optimizer.step()
            optimizer.zero_grad()
            assert optimizer.last_step is not None
            losses = optimizer.last_step.losses
            continue
        if how == "backward":
            optimizer.backward(iwrm_losses(model, x[part], y[part]))
            optimizer.step()
            optimizer.zero_grad()
            assert optimizer.last_step is not None
            losses = optimizer.last_step.losses
            continue

        def closure() -> Tensor:
            optimizer.zero_grad()
            losses = iwrm_losses(model, x[part], y[part])
            return losses.mean() if how == "scalar" else losses

        losses = optimizer.step(closure)
    return losses


def iwrm_rank(rank: int, world: int, sizes: list[int], how: str = "closure") -> dict[str, Any]:
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    if how == "scalar":
        warnings.filterwarnings("ignore", "The losses are a scalar")
    losses = train_iwrm(model, iwrm_batches(sum(sizes), STEPS), slices(sizes)[rank], how)
    return {"params": full_params(model), "losses": losses}


def iwrm_reference(sizes: list[int], how: str = "closure") -> dict[str, Any]:
    model = iwrm_model()
    if how == "scalar":
        warnings.filterwarnings("ignore", "The losses are a scalar")
    losses = train_iwrm(model, iwrm_batches(sum(sizes), STEPS), slice(None), how)
    return {"params": full_params(model), "losses": losses}


def unsupported_rank(rank: int, world: int, tasks: bool = False) -> str | None:
    """A method that needs whole rows of J on a fully_shard model: a clear error at the first
    forward. GradDrop (it draws one number per coordinate) on per-instance losses, or, with
    ``tasks``, a weighting of J itself (ExcessMTL's) on per-task losses."""
    if tasks:
        model: nn.Module = mtl_model()
        model = shard(model, [model.trunk[0], *model.heads])  # type: ignore[union-attr]
        optimizer = JDSGD(model.parameters(), lr=0.1, weighting=ExcessMTLWeighting(2))
        x, y = mtl_batches(3 * world)[0]
    else:
        model = iwrm_model()
        model = shard(model, [model[0], model[3]])
        optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=GradDrop(), batch_dim=0)
        x, y = iwrm_batches(3 * world, 1)[0]
    part = slices([3] * world)[rank]

    def closure() -> Tensor:
        if tasks:
            outputs, _ = model(x[part])
            return ((outputs - y[part]) ** 2).mean(dim=0)
        return iwrm_losses(model, x[part], y[part])

    try:
        optimizer.step(closure)
    except ValueError as error:
        return str(error)
    return None


def routes_rank(rank: int, world: int) -> dict[str, Any]:
    """Which route the engine took for each parameter at the first and at the third step."""
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    routes, evaluated = [], []
    for x, y in iwrm_batches(4 * world, STEPS):
        part = slices([4] * world)[rank]
        optimizer.step(lambda x=x, y=y: iwrm_losses(model, x[part], y[part]))
        engine = optimizer.distributed.engine()  # type: ignore[attr-defined]
        routes.append(sorted(set(engine._last_routes.values())))
        with torch.no_grad():  # an evaluation between steps leaves every layer sharded
            model(x[part])
        evaluated.append(all(isinstance(p, DTensor) for p in model[0]._parameters.values()))
    return {
        "routes": routes,
        "grad": type(next(model.parameters()).grad).__name__,
        "sharded_after_evaluation": evaluated,
    }


def tasks_rank(rank: int, world: int, batch: int) -> dict[str, Any]:
    model = mtl_model()
    model = shard(model, [model.trunk[0], *model.heads])
    losses = train_tasks(model, mtl_batches(batch * world), slices([batch] * world)[rank])
    return {"params": full_params(model), "losses": losses}


def tasks_reference(world: int, batch: int) -> dict[str, Any]:
    model = mtl_model()
    losses = train_tasks(model, mtl_batches(batch * world), slice(None))
    return {"params": full_params(model), "losses": losses}


def train_instance_tasks(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice
) -> Tensor:
    """Losses ``[B, T]`` (every instance, every task) with ``batch_dim=0``."""
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            outputs, _ = model(x[part])
            return (outputs - y[part]) ** 2

        losses = optimizer.step(closure)
    return losses


def instance_tasks_rank(rank: int, world: int, sizes: list[int]) -> dict[str, Any]:
    model = mtl_model()
    model = shard(model, [model.trunk[0], *model.heads])
    losses = train_instance_tasks(model, mtl_batches(sum(sizes)), slices(sizes)[rank])
    return {"params": full_params(model), "losses": losses}


def instance_tasks_reference(sizes: list[int]) -> dict[str, Any]:
    model = mtl_model()
    losses = train_instance_tasks(model, mtl_batches(sum(sizes)), slice(None))
    return {"params": full_params(model), "losses": losses}


class Encoder(nn.Module):
    """A transformer encoder layer and a linear head: one loss per sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(dim=1)).sum(dim=-1)


def encoder_model() -> Encoder:
    torch.manual_seed(0)
    return Encoder().double()


def encoder_batches(total: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [
        (
            torch.randn(total, 5, 8, generator=generator, dtype=torch.float64),
            torch.randn(total, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def train_encoder(model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice) -> Tensor:
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0)
    return step_instance_losses(model, optimizer, batches, part)


def step_instance_losses(
    model: nn.Module, optimizer: JDSGD, batches: list[tuple[Tensor, Tensor]], part: slice
) -> Tensor:
    """``step(closure)`` on each batch, the closure returning one squared error per instance."""
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            return (model(x[part]) - y[part]) ** 2

        losses = optimizer.step(closure)
    return losses


def encoder_rank(rank: int, world: int, sizes: list[int]) -> dict[str, Any]:
    model = encoder_model()
    model = shard(model, [model.layer, model.head])
    losses = train_encoder(model, encoder_batches(sum(sizes)), slices(sizes)[rank])
    return {"params": full_params(model), "losses": losses}


def encoder_reference(sizes: list[int]) -> dict[str, Any]:
    model = encoder_model()
    losses = train_encoder(model, encoder_batches(sum(sizes)), slice(None))
    return {"params": full_params(model), "losses": losses}


def resume_rank(rank: int, world: int, out_dir: str, how: str) -> dict[str, Any]:
    """Four steps straight vs two steps, a checkpoint, two steps in fresh objects.

    ``how``: "dcp" (``torch.distributed.checkpoint`` with ``get_state_dict``: every rank writes
    its shards) or "local" (each rank saves its own ``state_dict()``, sharded state included).
    """
    sizes = [3] * world
    part = slices(sizes)[rank]
    batches = iwrm_batches(sum(sizes), steps=4, seed=3)

    def build() -> tuple[nn.Module, JDAdam]:
        model = iwrm_model()
        model = shard(model, [model[0], model[3]])
        optimizer = JDAdam(model.parameters(), lr=0.05, weighting=EMAWeighting(), batch_dim=0)
        return model, optimizer

    def run(model: nn.Module, optimizer: JDAdam, steps: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in steps:

            def closure() -> Tensor:
                optimizer.zero_grad()
                return iwrm_losses(model, x[part], y[part])

            optimizer.step(closure)

    model, optimizer = build()
    run(model, optimizer, batches)
    straight = full_params(model)

    model, optimizer = build()
    run(model, optimizer, batches[:2])
    directory = Path(out_dir) / f"checkpoint-{how}"
    if how == "dcp":
        dcp.save(checkpoint_state(model, optimizer), checkpoint_id=directory)
    else:
        directory.mkdir(exist_ok=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            directory / f"rank{rank}.pt",
        )
    dist.barrier()
    model, optimizer = build()
    if how == "dcp":
        state = checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=directory)
        load_checkpoint_state(model, optimizer, state)
    else:
        saved = torch.load(directory / f"rank{rank}.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    run(model, optimizer, batches[2:])
    return {"straight": straight, "resumed": full_params(model)}


def failing_rank(rank: int, world: int, failure: str) -> dict[str, Any]:
    """Rank 1 fails at the second step (``failure`` says how), after its forward pass; then every
    rank takes one more step, which must work."""
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    batches = iwrm_batches(3 * world, 4)
    part = slices([3] * world)[rank]
    outcome: dict[str, Any] = {"error": None, "later_errors": []}
    for step, (x, y) in enumerate(batches):

        def closure() -> Tensor:
            optimizer.zero_grad()
            return broken_on_rank_1(iwrm_losses(model, x[part], y[part]), step, rank, failure)

        before = full_params(model)
        try:
            optimizer.step(closure)
        except Exception as error:
            if step != 1:
                outcome["later_errors"].append(f"{type(error).__name__}: {error}")
                continue
            outcome["error"] = (type(error).__name__, str(error))
            outcome["unchanged"] = all(
                torch.equal(a, b) for a, b in zip(before, full_params(model), strict=True)
            )
    outcome["params"] = full_params(model)
    return outcome


def train_bfloat16(model: nn.Module, part: slice, world: int) -> list[Tensor]:
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0)
    losses = []
    for x, y in iwrm_batches(8 * world, 4, seed=5):
        out = model(x[part].float()).squeeze(-1)
        optimizer.backward((out.float() - y[part].float()) ** 2)
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.last_step is not None
        losses.append(optimizer.last_step.losses.mean())
    return losses


def bfloat16_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))


def mixed_precision_rank(rank: int, world: int) -> dict[str, Any]:
    """``MixedPrecisionPolicy(param_dtype=bfloat16)`` on a float32 model, backward-then-step."""
    model = bfloat16_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    losses = train_bfloat16(model, slices([8] * world)[rank], world)
    return {"params": full_params(model), "losses": losses, "grad": _grad_kinds(model)}


def bfloat16_reference(world: int) -> dict[str, Any]:
    """The same steps in one process, in float32."""
    model = bfloat16_model()
    losses = train_bfloat16(model, slice(None), world)
    return {"params": full_params(model), "losses": losses}


def _grad_kinds(model: nn.Module) -> list[tuple[Any, ...]]:
    """Type, dtype, local and global shape of each ``.grad`` after one more backward."""
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0)
    x, y = iwrm_batches(8, 1, seed=6)[0]
    optimizer.backward((model(x.float()).squeeze(-1).float() - y.float()) ** 2)
    return [
        (type(p.grad).__name__, p.grad.dtype, tuple(p.grad.to_local().shape), tuple(p.grad.shape))
        for p in model.parameters()
        if isinstance(p.grad, DTensor)
    ]


def bytes_rank(rank: int, world: int) -> dict[str, int]:
    """The bytes this rank sent in one UPGrad IWRM step on 4 instances per rank."""
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    x, y = iwrm_batches(4 * world)[0]
    part = slices([4] * world)[rank]
    optimizer.step(lambda: iwrm_losses(model, x[part], y[part]))
    assert optimizer.distributed is not None
    sent: dict[str, int] = optimizer.distributed.bytes_sent
    return sent


def train_scalarized(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice, tasks: bool
) -> tuple[Tensor, list[Tensor]]:
    """A scalarizer's steps: ``GeometricMean`` of per-instance losses (``batch_dim=0``), or, with
    ``tasks``, the learnable ``UW`` of per-task mean losses (its parameters in the optimizer)."""
    uw = UW(2).double()
    if tasks:
        params = [*model.parameters(), *uw.parameters()]
        optimizer = JDSGD(params, lr=0.1, scalarizer=uw)
    else:
        optimizer = JDSGD(model.parameters(), lr=0.1, scalarizer=GeometricMean(), batch_dim=0)
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            if tasks:
                outputs, _ = model(x[part])
                return ((outputs - y[part]) ** 2).mean(dim=0)
            return iwrm_losses(model, x[part], y[part])

        losses = optimizer.step(closure)
    return losses, [p.detach().clone() for p in uw.parameters()]


def scalarized_rank(rank: int, world: int, tasks: bool) -> dict[str, Any]:
    if tasks:
        model: nn.Module = mtl_model()
        model = shard(model, [model.trunk[0], *model.heads])  # type: ignore[union-attr]
        batches = mtl_batches(TASK_BATCH[world] * world)
        part = slices([TASK_BATCH[world]] * world)[rank]
    else:
        model = iwrm_model()
        model = shard(model, [model[0], model[3]])
        batches = iwrm_batches(sum(IWRM_SIZES[world]))
        part = slices(IWRM_SIZES[world])[rank]
    losses, uw = train_scalarized(model, batches, part, tasks)
    return {"params": full_params(model) + uw, "losses": losses}


def scalarized_reference(world: int, tasks: bool) -> dict[str, Any]:
    model: nn.Module = mtl_model() if tasks else iwrm_model()
    batches = (
        mtl_batches(TASK_BATCH[world] * world) if tasks else iwrm_batches(sum(IWRM_SIZES[world]))
    )
    losses, uw = train_scalarized(model, batches, slice(None), tasks)
    return {"params": full_params(model) + uw, "losses": losses}


def train_trimmed(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice, how: str
) -> Tensor:
    """``TrimmedMean`` on the global Jacobian. ``how``: "instances" (``[B]`` losses of the
    MLP, ``batch_dim=0``), "instance-tasks" (``[B, 2]`` of the two-head model, ``batch_dim=0``)
    or "tasks" (per-task means of the two-head model, no ``batch_dim``)."""
    options: dict[str, Any] = {} if how == "tasks" else {"batch_dim": 0}
    trim = {"instances": 1, "instance-tasks": 2, "tasks": 0}[how]
    optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=TrimmedMean(trim), **options)
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            if how == "instances":
                return iwrm_losses(model, x[part], y[part])
            outputs, _ = model(x[part])
            errors = (outputs - y[part]) ** 2
            return errors.mean(dim=0) if how == "tasks" else errors

        losses = optimizer.step(closure)
    return losses


def _trimmed_setup(
    world: int, how: str
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], list[int]]:
    if how == "instances":
        return iwrm_model(), iwrm_batches(sum(IWRM_SIZES[world])), IWRM_SIZES[world]
    sizes = [TASK_BATCH[world]] * world if how == "tasks" else IWRM_SIZES[world]
    return mtl_model(), mtl_batches(sum(sizes)), sizes


def trimmed_rank(rank: int, world: int, how: str) -> dict[str, Any]:
    model, batches, sizes = _trimmed_setup(world, how)
    if how == "instances":
        model = shard(model, [model[0], model[3]])  # type: ignore[index]
    else:
        model = shard(model, [model.trunk[0], *model.heads])  # type: ignore[union-attr]
    losses = train_trimmed(model, batches, slices(sizes)[rank], how)
    return {"params": full_params(model), "losses": losses}


def trimmed_reference(world: int, how: str) -> dict[str, Any]:
    model, batches, _ = _trimmed_setup(world, how)
    losses = train_trimmed(model, batches, slice(None), how)
    return {"params": full_params(model), "losses": losses}


class Deep(nn.Module):
    """Four ``Linear(8, 8)`` + ``Tanh`` layers and a ``Linear(8, 1)`` head, each to be sharded."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.head(x).sum(dim=-1)


class CheckpointedDeep(Deep):
    """``Deep`` with each hidden layer under activation checkpointing (run again in backward)."""

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = checkpoint(_linear_tanh, layer, x, use_reentrant=False)
        return self.head(x).sum(dim=-1)


def _linear_tanh(layer: nn.Module, x: Tensor) -> Tensor:
    return torch.tanh(layer(x))


def deep_model(checkpointed: bool = False) -> Deep:
    torch.manual_seed(0)
    return (CheckpointedDeep() if checkpointed else Deep()).double()


def deep_batches(total: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(total, 8, generator=generator, dtype=torch.float64),
            torch.randn(total, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def train_deep(
    model: Deep, batches: list[tuple[Tensor, Tensor]], part: slice
) -> tuple[Tensor, dict[str, int], dict[str, int]]:
    """Steps on ``model``; the losses, and per phase the peak number of parameters whose
    unsharded storage this rank held when the probe ran, and how many times it ran."""
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    peaks: dict[str, int] = {"forward": 0, "backward": 0}
    seen: dict[str, int] = {"forward": 0, "backward": 0}

    def probe(where: str) -> None:
        distributed = optimizer.distributed
        unsharded = [] if distributed is None else distributed.unsharded()  # type: ignore[attr-defined]
        held = sum(p.numel() for p in unsharded if p.untyped_storage().nbytes() > 0)
        peaks[where] = max(peaks[where], held)
        seen[where] += 1

    def in_layer(module: nn.Module, args: tuple[Any, ...]) -> None:
        # Runs inside the layer's forward, after FSDP2's pre-forward hook gathered it; the hook on
        # its input runs in each backward pass through the layer, once the layer's own backward
        # has used its parameters (and before FSDP2's post-backward hook can free them).
        probe("forward")
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: probe("backward"))

    handles = [layer.register_forward_pre_hook(in_layer) for layer in [*model.hidden, model.head]]
    losses = step_instance_losses(model, optimizer, batches, part)
    for handle in handles:
        handle.remove()
    return losses, peaks, seen


def deep_rank(rank: int, world: int, sizes: list[int], checkpointed: bool) -> dict[str, Any]:
    """The step's exactness, and the unsharded parameters this rank held at any time in it."""
    model = deep_model(checkpointed)
    layers = [sum(p.numel() for p in m.parameters()) for m in [*model.hidden, model.head]]
    model = shard(model, [*model.hidden, model.head])  # type: ignore[assignment]
    losses, peaks, seen = train_deep(model, deep_batches(sum(sizes)), slices(sizes)[rank])
    return {
        "params": full_params(model),
        "losses": losses,
        "peaks": peaks,
        "seen": seen,
        "layers": layers,
    }


def deep_reference(sizes: list[int], checkpointed: bool) -> dict[str, Any]:
    model = deep_model(checkpointed)
    losses, _, _ = train_deep(model, deep_batches(sum(sizes)), slice(None))
    return {"params": full_params(model), "losses": losses}


# instances per rank, per world size
IWRM_SIZES = {2: [4, 3], 3: [3, 2, 4]}
IWRM_VARIANTS = {2: ["modules", "backward", "accumulate", "scalar"], 3: ["backward"]}
TASK_BATCH = {2: 3, 3: 2}
ENCODER_SIZES = {2: [3, 2], 3: [2, 3, 2]}
TRIMMED = ["instances", "instance-tasks", "tasks"]
# One instance: no independence probe, so one backward pass where the other ranks run two.
DEEP_SIZES = {2: [1, 5], 3: [3, 1, 6]}
FAILURES = {2: ["raise", "nan", "shape"], 3: ["raise"]}


def overflow_rank(rank: int, world: int) -> dict[str, Any]:
    """Backward-then-step; the last rank's losses are infinite at the second step (an overflow in
    float16): every rank's backward gives a skipped step and every rank's step() refuses it."""
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    return overflow_history(model, optimizer, lambda: full_params(model), rank, world)


def all_scenarios_rank(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Every scenario for this world size, in one process group."""
    results: dict[str, Any] = {}

    def record(key: str, fn: Any, *args: Any) -> None:
        try:
            results[key] = fn(rank, world, *args)
        except Exception as error:  # reported to the test, which fails on it
            results[key] = f"{type(error).__name__}: {error}"

    record("iwrm", iwrm_rank, IWRM_SIZES[world])
    for how in IWRM_VARIANTS[world]:
        sizes = [4] * world if how in ("scalar", "accumulate") else IWRM_SIZES[world]
        record(f"iwrm-{how}", iwrm_rank, sizes, how)
    record("tasks", tasks_rank, TASK_BATCH[world])
    record("instance-tasks", instance_tasks_rank, IWRM_SIZES[world])
    record("encoder", encoder_rank, ENCODER_SIZES[world])
    record("deep", deep_rank, DEEP_SIZES[world], False)
    record("scalarized-instances", scalarized_rank, False)
    record("scalarized-tasks", scalarized_rank, True)
    for how in TRIMMED:
        record(f"trimmed-{how}", trimmed_rank, how)
    if world == 2:
        record("deep-checkpointed", deep_rank, DEEP_SIZES[world], True)
    record("routes", routes_rank)
    for failure in FAILURES[world]:
        record(f"failure-{failure}", failing_rank, failure)
    record("overflow", overflow_rank)
    if world == 2:
        record("encoder-one-instance", encoder_rank, [1, 3])
        record("unsupported", unsupported_rank)
        record("unsupported-tasks", unsupported_rank, True)
        record("resume-dcp", resume_rank, out_dir, "dcp")
        record("resume-local", resume_rank, out_dir, "local")
        record("bfloat16", mixed_precision_rank)
        record("bytes", bytes_rank)
    return results
