"""What each rank runs in the distributed tests (module-level, so spawned processes can import it).

Every scenario draws the *global* batches from a fixed seed and gives rank ``r`` its slice, so a
single process can replay the same steps on the concatenated batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDSGD, JDAdam
from jdoptim.aggregation import MeanWeighting, MGDAWeighting, TrimmedMean, UPGradWeighting
from jdoptim.scalarization import FAMO, UW, GeometricMean
from tests.optim._models import EMAWeighting

STEPS = 3


def iwrm_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).double()


def iwrm_batches(total: int, steps: int = STEPS, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(total, 5, generator=generator, dtype=torch.float64),
            torch.randn(total, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def iwrm_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).squeeze(-1) - y) ** 2


def method_options(method: str) -> dict[str, Any]:
    """Optimizer keyword arguments for a method name of the scenarios."""
    if method == "mean":
        return {"weighting": MeanWeighting()}
    if method == "upgrad":
        return {"weighting": UPGradWeighting()}
    if method == "mgda":
        return {"weighting": MGDAWeighting()}
    if method == "ema":
        return {"weighting": EMAWeighting()}
    if method == "trimmed_mean":  # a Jacobian aggregator: the autojac path
        return {"aggregator": TrimmedMean(1)}
    if method == "geometric_mean":  # a nonlinear scalarizer
        return {"scalarizer": GeometricMean()}
    raise ValueError(method)


def slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def train_iwrm(
    model: nn.Module,
    method: str,
    batches: list[tuple[Tensor, Tensor]],
    part: slice,
    batch_dim: int | None = 0,
    backward_then_step: bool = False,
    **options: Any,
) -> Tensor:
    scalar = method == "scalar"  # the closure returns the mean loss: a plain gradient step
    if scalar:
        warnings.filterwarnings("ignore", "The losses are a scalar")
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        batch_dim=None if scalar else batch_dim,
        **method_options("upgrad" if scalar else method),
        **options,
    )
    losses = torch.empty(0)
    for x, y in batches:
        if backward_then_step:  # the forward runs outside the optimizer, as in a torch loop
            optimizer.backward(iwrm_losses(model, x[part], y[part]))
            optimizer.step()
            optimizer.zero_grad()
            assert optimizer.last_step is not None
            losses = optimizer.last_step.losses
            continue

        def closure() -> Tensor:
            optimizer.zero_grad()
            losses = iwrm_losses(model, x[part], y[part])
            return losses.mean() if scalar else losses

        losses = optimizer.step(closure)
    return losses


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- instance-wise ---------------------------------------------------------------------------


def iwrm_rank(
    rank: int, world: int, method: str, sizes: list[int], ddp: str, batch_dim: int | None
) -> Any:
    """``ddp``: "no" (a plain model, process_group=), "group" (DDP, process_group=), "modules"
    (modules=DDP), "plain" (DDP and nothing else: the group is found from the forward pass) or
    "backward" (DDP, nothing else, backward-then-step)."""
    model = iwrm_model()
    batches = iwrm_batches(sum(sizes))
    part = slices(sizes)[rank]
    if ddp == "group":
        wrapped = DistributedDataParallel(model)
        losses = train_iwrm(
            wrapped, method, batches, part, batch_dim, process_group=wrapped.process_group
        )
    elif ddp in ("plain", "backward"):  # a plain swap of an SGD + DDP loop
        wrapped = DistributedDataParallel(model)
        losses = train_iwrm(
            wrapped, method, batches, part, batch_dim, backward_then_step=ddp == "backward"
        )
    elif ddp == "modules":  # the optimizer finds the process group in the DDP wrapper
        wrapped = DistributedDataParallel(model)
        losses = train_iwrm(wrapped, method, batches, part, batch_dim, modules=wrapped)
    else:
        losses = train_iwrm(model, method, batches, part, batch_dim, process_group=dist.group.WORLD)
    return {"params": params_of(model), "losses": losses}


def iwrm_reference(method: str, sizes: list[int], batch_dim: int | None) -> dict[str, Any]:
    model = iwrm_model()
    losses = train_iwrm(model, method, iwrm_batches(sum(sizes)), slice(None), batch_dim)
    return {"params": params_of(model), "losses": losses}


# --- multi-task ------------------------------------------------------------------------------


class TwoTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(x)
        outputs = torch.cat([head(features) for head in self.heads], dim=1)
        return outputs, features


def mtl_model() -> TwoTaskModel:
    torch.manual_seed(0)
    return TwoTaskModel().double()


def mtl_batches(total: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(total, 5, generator=generator, dtype=torch.float64),
            torch.randn(total, 2, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def train_mtl(
    model: TwoTaskModel, batches: list[tuple[Tensor, Tensor]], part: slice, **options: Any
) -> Tensor:
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        weighting=UPGradWeighting(),
        shared_params=model.trunk.parameters(),
        **options,
    )
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> tuple[Tensor, Tensor]:
            optimizer.zero_grad()
            outputs, features = model(x[part])
            return ((outputs - y[part]) ** 2).mean(dim=0), features

        losses = optimizer.step(closure)
    return losses


def train_famo(
    model: TwoTaskModel, batches: list[tuple[Tensor, Tensor]], part: slice, **options: Any
) -> Tensor:
    """A task-loss scalarizer that recomputes the losses after each step (``info.evaluate()``)."""
    optimizer = JDSGD(model.parameters(), lr=0.1, scalarizer=FAMO(2), **options)
    return step_task_losses(model, optimizer, batches, part)


def train_tasks(
    model: TwoTaskModel, batches: list[tuple[Tensor, Tensor]], part: slice, **options: Any
) -> Tensor:
    """UPGrad on per-task losses without shared_params or batch_dim (the [T, n] Jacobian path)."""
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), **options)
    return step_task_losses(model, optimizer, batches, part)


def train_uw(
    model: TwoTaskModel, batches: list[tuple[Tensor, Tensor]], part: slice, **options: Any
) -> Tensor:
    """The learnable UW scalarizer on per-task losses, its parameters in the optimizer."""
    uw = UW(2).double()
    params = [*model.parameters(), *uw.parameters()]
    optimizer = JDSGD(params, lr=0.1, scalarizer=uw, **options)
    return step_task_losses(model, optimizer, batches, part)


def step_task_losses(
    model: nn.Module, optimizer: JDSGD, batches: list[tuple[Tensor, Tensor]], part: slice
) -> Tensor:
    """``step(closure)`` on each batch, the closure returning the mean loss per task."""
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            outputs, _ = model(x[part])
            return ((outputs - y[part]) ** 2).mean(dim=0)

        losses = optimizer.step(closure)
    return losses


TASK_TRAINERS = {"mtl": train_mtl, "famo": train_famo, "tasks": train_tasks, "uw": train_uw}


def task_losses_rank(rank: int, world: int, kind: str, batch: int) -> Any:
    """One rank's run of a per-task-losses scenario (``kind`` names its trainer)."""
    model = mtl_model()
    part = slices([batch] * world)[rank]
    train = TASK_TRAINERS[kind]
    losses = train(model, mtl_batches(batch * world), part, process_group=dist.group.WORLD)
    return {"params": params_of(model), "losses": losses}


def task_losses_reference(kind: str, world: int, batch: int) -> dict[str, Any]:
    """The same scenario in one process, on the concatenated batch."""
    model = mtl_model()
    losses = TASK_TRAINERS[kind](model, mtl_batches(batch * world), slice(None))
    return {"params": params_of(model), "losses": losses}


# --- checkpoints -----------------------------------------------------------------------------


def resume_rank(rank: int, world: int, out_dir: str) -> Any:
    """Four steps straight vs two steps, rank 0's checkpoint, two steps in fresh objects."""
    sizes = [3] * world
    part = slices(sizes)[rank]
    batches = iwrm_batches(sum(sizes), steps=4, seed=3)

    def build() -> tuple[nn.Module, JDAdam]:
        model = iwrm_model()
        optimizer = JDAdam(
            model.parameters(),
            lr=0.05,
            weighting=EMAWeighting(),
            batch_dim=0,
            process_group=dist.group.WORLD,
        )
        return model, optimizer

    def run(model: nn.Module, optimizer: JDAdam, steps: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in steps:

            def closure() -> Tensor:
                optimizer.zero_grad()
                return iwrm_losses(model, x[part], y[part])

            optimizer.step(closure)

    model, optimizer = build()
    run(model, optimizer, batches)
    straight = params_of(model)

    model, optimizer = build()
    run(model, optimizer, batches[:2])
    path = Path(out_dir) / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    dist.barrier()
    checkpoint = torch.load(path, weights_only=False)
    model, optimizer = build()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    run(model, optimizer, batches[2:])
    return {"straight": straight, "resumed": params_of(model)}


# --- failures --------------------------------------------------------------------------------


def broken_on_rank_1(losses: Tensor, step: int, rank: int, failure: str) -> Tensor:
    """Rank 1's losses at step 1 broken as ``failure`` says: raise, NaN, or a wrong shape."""
    if step == 1 and rank == 1:
        if failure == "raise":
            raise ValueError("data loader broke on rank 1")
        if failure == "nan":
            return losses * float("nan")
        if failure == "shape":
            return torch.stack([losses, losses], dim=1)
    return losses


def failing_rank(rank: int, world: int, failure: str) -> Any:
    """Rank 1 fails at the second step (``failure`` says how); returns what each rank raised."""
    model = iwrm_model()
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        weighting=UPGradWeighting(),
        batch_dim=0,
        process_group=dist.group.WORLD,
    )
    batches = iwrm_batches(3 * world)
    part = slices([3] * world)[rank]
    outcome: dict[str, Any] = {"error": None}
    for step, (x, y) in enumerate(batches):

        def closure() -> Tensor:
            optimizer.zero_grad()
            return broken_on_rank_1(iwrm_losses(model, x[part], y[part]), step, rank, failure)

        before = params_of(model)
        try:
            optimizer.step(closure)
        except Exception as error:
            outcome["error"] = (type(error).__name__, str(error))
            outcome["unchanged"] = all(
                torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True)
            )
            break
    return outcome


def failing_mtl_rank(rank: int, world: int) -> Any:
    """Multi-task mode; rank 0's closure raises at the second step."""
    model = mtl_model()
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        weighting=UPGradWeighting(),
        shared_params=model.trunk.parameters(),
        process_group=dist.group.WORLD,
    )
    part = slices([2] * world)[rank]
    outcome: dict[str, Any] = {"error": None}
    for step, (x, y) in enumerate(mtl_batches(2 * world)):

        def closure() -> tuple[Tensor, Tensor]:
            optimizer.zero_grad()
            if step == 1 and rank == 0:
                raise RuntimeError("rank 0 ran out of memory")
            outputs, features = model(x[part])
            return ((outputs - y[part]) ** 2).mean(dim=0), features

        before = params_of(model)
        try:
            optimizer.step(closure)
        except Exception as error:
            outcome["error"] = (type(error).__name__, str(error))
            outcome["unchanged"] = all(
                torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True)
            )
            break
    return outcome


def mismatched_methods_rank(rank: int, world: int) -> Any:
    """Rank 0 built its optimizer with MeanWeighting, the others with UPGrad."""
    model = iwrm_model()
    method = "mean" if rank == 0 else "upgrad"
    x, y = iwrm_batches(3 * world)[0]
    part = slices([3] * world)[rank]
    try:
        train_iwrm(model, method, [(x, y)], part, 0, process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return None


class TwoHeads(nn.Module):
    """A trunk and two heads; ``routes[i]`` sends instance ``i`` through head ``b`` (else ``a``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(6, 1)

    def forward(self, x: Tensor, routes: Tensor) -> Tensor:
        features = self.trunk(x)
        if bool(routes.all()):
            return self.b(features).squeeze(-1)
        if not bool(routes.any()):
            return self.a(features).squeeze(-1)
        return torch.where(routes, self.b(features).squeeze(-1), self.a(features).squeeze(-1))


def branch_routes(total: int) -> Tensor:
    """Rank 0's instances (the first half) through head b, rank 1's through head a."""
    return torch.arange(total) < total // 2


def train_branches(model: nn.Module, part: slice, **options: Any) -> dict[str, Any]:
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    for x, y in iwrm_batches(6):
        routes = branch_routes(6)

        def closure() -> Tensor:
            optimizer.zero_grad()
            return (model(x[part], routes[part]) - y[part].squeeze(-1)) ** 2

        optimizer.step(closure)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {"params": params_of(inner)}


def branch_per_rank_rank(rank: int, world: int) -> Any:
    """Each rank's instances take another head (a branch DDP's find_unused_parameters is for)."""
    model = DistributedDataParallel(TwoHeads().double(), find_unused_parameters=True)
    return train_branches(model, slices([3, 3])[rank])


def branch_per_rank_reference() -> dict[str, Any]:
    return train_branches(TwoHeads().double(), slice(0, 6))


def mismatched_gramian_methods_rank(rank: int, world: int) -> Any:
    """Rank 0 built its optimizer with UPGrad, the others with MGDA: the same kind of step."""
    model = DistributedDataParallel(iwrm_model())
    method = "upgrad" if rank == 0 else "mgda"
    x, y = iwrm_batches(3 * world)[0]
    part = slices([3] * world)[rank]
    try:
        train_iwrm(model, method, [(x, y)], part, 0)
    except ValueError as error:
        return str(error)
    return None


def static_graph_rank(rank: int, world: int) -> Any:
    model = DistributedDataParallel(iwrm_model(), static_graph=True)
    x, y = iwrm_batches(3 * world)[0]
    try:
        train_iwrm(model, "upgrad", [(x, y)], slices([3] * world)[rank], 0)
    except ValueError as error:
        return str(error)
    return None


def second_ddp_model_rank(rank: int, world: int) -> Any:
    """A jdoptim optimizer for one DDP model and torch's SGD for another (a GAN's two networks):
    the optimizer silenced every DDP model's gradient synchronisation, so the plain one's replicas
    drifted apart. Returns the plain model's parameters (equal on every rank, as DDP keeps them)."""
    model = DistributedDataParallel(iwrm_model())
    other = DistributedDataParallel(iwrm_model(seed=1))
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    plain = torch.optim.SGD(other.parameters(), lr=0.1)
    part = slices([3] * world)[rank]
    for x, y in iwrm_batches(3 * world):
        optimizer.zero_grad()
        optimizer.backward(iwrm_losses(model, x[part], y[part]))
        optimizer.step()
        plain.zero_grad()
        iwrm_losses(other, x[part], y[part]).mean().backward()
        plain.step()
    return {"params": [p.detach().clone() for p in other.parameters()]}


def plain_backward_first_rank(rank: int, world: int) -> Any:
    """A plain backward of an auxiliary loss before optimizer.backward, each rank on its own
    batch: its gradients are the window's base, which DDP would average; they stayed each rank's
    own (the DDP wrapper's synchronisation is off in jdoptim's steps) and the replicas drifted."""
    model = DistributedDataParallel(iwrm_model())
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    part = slices([3] * world)[rank]
    for x, y in iwrm_batches(3 * world):
        optimizer.zero_grad()
        (model(x[part]).pow(2).mean() * (rank + 1)).backward()  # differs between the ranks
        optimizer.backward(iwrm_losses(model, x[part], y[part]))
        optimizer.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def batch_norm_buffers_rank(rank: int, world: int) -> Any:
    """BatchNorm in training mode on a DDP model: DDP broadcasts rank 0's buffers at the forward
    after a training forward; silenced by the optimizer, its post-forward turned that off and the
    ranks' running statistics drifted apart (different eval outputs per rank). Checked against
    plain DDP with torch's SGD on the mean loss (MeanWeighting takes the same step)."""
    buffers, outputs = {}, {}
    for kind in ("plain", "jdoptim"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the batch statistics' warning
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
            model = DistributedDataParallel(net.double())
            if kind == "plain":
                optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            else:
                optimizer = JDSGD(
                    model.parameters(), lr=0.05, weighting=MeanWeighting(), batch_dim=0
                )
            for step in range(3):
                generator = torch.Generator().manual_seed(10 * step + rank)
                x = torch.randn(6, 5, generator=generator, dtype=torch.float64) + rank
                y = torch.randn(6, generator=generator, dtype=torch.float64)
                optimizer.zero_grad()
                losses = (model(x).squeeze(-1) - y) ** 2
                if kind == "plain":
                    losses.mean().backward()
                else:
                    assert isinstance(optimizer, JDSGD)
                    optimizer.backward(losses)
                optimizer.step()
            model.eval()
            with torch.no_grad():
                outputs[kind] = model(torch.ones(2, 5, dtype=torch.float64)).reshape(-1)
            buffers[kind] = [b.clone() for b in model.module.buffers()]
    return {"buffers": buffers, "outputs": outputs}


def sparse_table_rank(rank: int, world: int) -> Any:
    """A DDP model with nn.Embedding(sparse=True): its sparse .grad went into the all-reduce,
    which flattened it (a RuntimeError on every rank); also as a window's base (no zero_grad)."""
    torch.manual_seed(0)
    table = nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1))
    model = DistributedDataParallel(table.double())
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):  # no zero_grad: the second window opens on the first step's sparse .grad
        tokens = torch.randint(0, 7, (4, 3), generator=generator)
        optimizer.backward(model(tokens).squeeze(-1) ** 2)
        optimizer.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def first_step_failure_rank(rank: int, world: int) -> Any:
    """A plain DDP swap whose closure fails on rank 1 at the very first step, after the forward
    pass (the optimizer learns of the DDP model from that pass): every rank raises, then trains
    on."""
    model = DistributedDataParallel(iwrm_model())
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    outcomes = []
    for step, (x, y) in enumerate(iwrm_batches(3 * world)):
        part = slices([3] * world)[rank]

        def closure() -> Tensor:
            optimizer.zero_grad()
            losses = iwrm_losses(model, x[part], y[part])
            if step == 0 and rank == 1:
                raise RuntimeError("bad batch on rank 1")
            return losses

        try:
            outcomes.append(tuple(optimizer.step(closure).shape))
        except Exception as error:
            outcomes.append(type(error).__name__)
    return {"outcomes": outcomes}


# --- bytes ---------------------------------------------------------------------------------


def bytes_rank(rank: int, world: int) -> dict[str, int]:
    """The bytes this rank sent in one UPGrad IWRM step on 4 instances per rank."""
    model = iwrm_model()
    optimizer = JDSGD(
        model.parameters(),
        lr=0.1,
        weighting=UPGradWeighting(),
        batch_dim=0,
        process_group=dist.group.WORLD,
    )
    x, y = iwrm_batches(4 * world)[0]
    part = slices([4] * world)[rank]
    optimizer.step(lambda: iwrm_losses(model, x[part], y[part]))
    assert optimizer.distributed is not None
    return optimizer.distributed.bytes_sent


# --- float16 loss scaling (GradScaler) --------------------------------------------------------

SCALED_SIZES = [3, 2]
SCALED_STEPS = 4
OVERFLOW_STEP = 1


class _ScaledGradient(torch.autograd.Function):
    """The identity, whose backward multiplies each instance's gradient by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(factor)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def overflow_factors(overflow: str, step: int, total: int) -> tuple[Tensor, Tensor]:
    """Factors of the global batch's losses and of their gradients at ``step``: infinite on the
    instances of the last rank at ``OVERFLOW_STEP`` (``overflow``: "losses", "gradients" or
    "none"), ones elsewhere."""
    losses, grads = torch.ones(total, dtype=torch.float64), torch.ones(total, dtype=torch.float64)
    if step == OVERFLOW_STEP and overflow != "none":
        last = slices(SCALED_SIZES)[-1]
        if overflow == "first-loss":  # the first instance of the last rank only
            last = slice(last.start, last.start + 1)
        (grads if overflow == "gradients" else losses)[last] = float("inf")
    return losses, grads


def halves(part: slice, total: int) -> list[slice]:
    """``part`` of ``range(total)`` as two micro-batches (the first one the larger)."""
    start, stop, _ = part.indices(total)
    middle = start + (stop - start + 1) // 2
    return [slice(start, middle), slice(middle, stop)]


def train_scaled(
    model: nn.Module, method: str, mode: str, overflow: str, part: slice, **options: Any
) -> dict[str, Any]:
    """IWRM with a CPU GradScaler whose scale grows at every finite step; ``mode``: "closure"
    (``grad_scaler=`` does it all), "backward" (``scaler.scale``, ``scaler.step`` and ``update``
    in the loop) or "accumulate" (the same, two micro-batches per step). Records the parameters
    and the scale after each step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    optimizer = JDSGD(
        model.parameters(), lr=0.1, batch_dim=0, grad_scaler=scaler, **method_options(method)
    )
    total = sum(SCALED_SIZES)
    history: list[dict[str, Any]] = []
    for step, (x, y) in enumerate(iwrm_batches(total, steps=SCALED_STEPS, seed=4)):
        loss_factor, grad_factor = overflow_factors(overflow, step, total)

        def losses(part: slice = part) -> Tensor:
            output = _ScaledGradient.apply(model(x[part]).squeeze(-1), grad_factor[part])
            return (output - y[part]) ** 2 * loss_factor[part]

        if mode == "closure":

            def closure() -> Tensor:
                optimizer.zero_grad()
                return losses()

            optimizer.step(closure)
        else:
            for micro in halves(part, total) if mode == "accumulate" else [part]:
                optimizer.backward(scaler.scale(losses(micro)))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        history.append({"params": params_of(model), "scale": scaler.get_scale()})
    assert optimizer.last_step is not None
    return {
        "history": history,
        "losses": optimizer.last_step.losses,
        "scaler": scaler.state_dict(),
    }


def scaled_rank(rank: int, world: int, method: str, mode: str, overflow: str) -> dict[str, Any]:
    """A DDP model, found from the forward pass, as a float16 loop on a GPU without bfloat16."""
    model = iwrm_model()
    return train_scaled(
        DistributedDataParallel(model), method, mode, overflow, slices(SCALED_SIZES)[rank]
    )


def scaled_reference(method: str, mode: str, overflow: str) -> dict[str, Any]:
    return train_scaled(iwrm_model(), method, mode, overflow, slice(None))


# (method, step form, overflow) on 2 ranks
SCALED_CASES = [
    ("upgrad", "closure", "none"),
    ("ema", "closure", "none"),  # not scale-invariant: it must see the unscaled Gramian
    ("trimmed_mean", "closure", "none"),  # the Jacobian path
    ("mean", "closure", "none"),  # weights from the shape only
    ("upgrad", "backward", "none"),
    ("ema", "backward", "none"),
    ("upgrad", "closure", "losses"),
    ("upgrad", "backward", "losses"),
    ("upgrad", "closure", "gradients"),
    ("upgrad", "backward", "gradients"),
    ("upgrad", "accumulate", "none"),
    ("upgrad", "accumulate", "first-loss"),  # only the first micro-batch of rank 1 overflows
    ("trimmed_mean", "closure", "gradients"),
]


def unscaled_overflow_rank(rank: int, world: int) -> dict[str, Any]:
    """Backward-then-step on a DDP model without a scaler; the last rank's losses are infinite at
    the second step: every rank's backward skips it, every rank's step() refuses it."""
    model = iwrm_model()
    ddp = DistributedDataParallel(model)
    optimizer = JDSGD(ddp.parameters(), lr=0.1, batch_dim=0)
    return overflow_history(ddp, optimizer, lambda: params_of(model), rank, world)


def overflow_history(
    model: nn.Module,
    optimizer: JDSGD,
    read_params: Callable[[], list[Tensor]],
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Backward-then-step on 3 instances per rank; the last rank's losses are infinite at the
    second step. Per step: whether backward found it finite, step()'s refusal, the parameters."""
    part = slices([3] * world)[rank]
    history: list[dict[str, Any]] = []
    for step, (x, y) in enumerate(iwrm_batches(3 * world)):
        losses = iwrm_losses(model, x[part], y[part])
        if step == 1 and rank == world - 1:
            losses = losses * float("inf")
        record = optimizer.backward(losses)
        refused = None
        try:
            optimizer.step()
        except ValueError as error:
            refused = str(error)
        optimizer.zero_grad()
        history.append({"finite": record.finite, "refused": refused, "params": read_params()})
    return {"history": history}


def same(actual: list[Tensor], expected: list[Tensor]) -> bool:
    return all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


def assert_every_rank_skipped_the_overflow(histories: list[list[dict[str, Any]]]) -> None:
    """What :func:`overflow_history` must give on every rank: the second step skipped and refused
    with nothing changed, the others taken, and the ranks alike at the end."""
    for history in histories:
        assert [h["finite"] for h in history] == [True, False, True]
        assert history[1]["refused"] is not None and "non-finite" in history[1]["refused"]
        assert history[0]["refused"] is None and history[2]["refused"] is None
        assert same(history[0]["params"], history[1]["params"])
        assert not same(history[1]["params"], history[2]["params"])
    for history in histories[1:]:
        assert same(history[-1]["params"], histories[0][-1]["params"])


def scaled_key(method: str, mode: str, overflow: str) -> str:
    return f"scaled-{method}-{mode}-overflow={overflow}"


def scaled_task_losses(kind: str, world: int, part: slice, **options: Any) -> dict[str, Any]:
    """A per-task-losses scenario under ``grad_scaler=`` (its scale growing at every step)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    model = mtl_model()
    batches = mtl_batches(MTL_BATCH[world] * world)
    losses = TASK_TRAINERS[kind](model, batches, part, grad_scaler=scaler, **options)
    return {"params": params_of(model), "losses": losses, "scaler": scaler.state_dict()}


def scaled_task_losses_rank(rank: int, world: int, kind: str) -> dict[str, Any]:
    part = slices([MTL_BATCH[world]] * world)[rank]
    return scaled_task_losses(kind, world, part, process_group=dist.group.WORLD)


# --- one launch per world size ---------------------------------------------------------------


# (method, instances per rank, DDP wrapping, batch_dim)
def encoder_one_instance_rank(rank: int, world: int, sizes: list[int]) -> dict[str, Any]:
    """A DDP transformer encoder where one rank holds a single instance: the engine gives that
    rank other forms of the attention layer's terms than the others."""
    from tests.distributed._fsdp_scenarios import encoder_batches, encoder_model, train_encoder

    model = encoder_model()
    losses = train_encoder(
        DistributedDataParallel(model), encoder_batches(sum(sizes)), slices(sizes)[rank]
    )
    return {"params": params_of(model), "losses": losses}


ONE_INSTANCE_SIZES = {2: [3, 1], 3: [1, 3, 2]}


IWRM_CASES: dict[int, list[tuple[str, list[int], str, int | None]]] = {
    2: [
        ("mean", [4, 4], "no", 0),
        ("upgrad", [4, 4], "no", 0),
        ("mean", [4, 4], "group", 0),
        ("upgrad", [4, 4], "modules", 0),
        ("trimmed_mean", [3, 3], "no", 0),
        ("geometric_mean", [3, 3], "no", 0),
        ("scalar", [3, 3], "group", 0),
        ("upgrad", [4, 3], "plain", 0),
        ("upgrad", [4, 4], "backward", 0),
        ("trimmed_mean", [3, 3], "backward", 0),
    ],
    3: [
        ("upgrad", [3, 2, 4], "no", 0),
        ("mean", [2, 3, 2], "group", 0),
        ("upgrad", [2, 3, 2], "plain", 0),
    ],
}
MTL_BATCH = {2: 3, 3: 2}
FAILURES = {2: ["raise", "nan", "shape"], 3: ["raise"]}


def all_scenarios_rank(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Every scenario for this world size, in one process group (failures leave it in sync)."""
    results: dict[str, Any] = {}

    def record(key: str, fn: Any, *args: Any) -> None:
        try:
            results[key] = fn(rank, world, *args)
        except Exception as error:  # reported to the test, which fails on it
            results[key] = f"{type(error).__name__}: {error}"

    for method, sizes, ddp, batch_dim in IWRM_CASES[world]:
        key = f"iwrm-{method}-{sizes}-ddp={ddp}-bd={batch_dim}"
        record(key, iwrm_rank, method, sizes, ddp, batch_dim)
    for kind in TASK_TRAINERS:
        record(kind, task_losses_rank, kind, MTL_BATCH[world])
    record("encoder-one-instance", encoder_one_instance_rank, ONE_INSTANCE_SIZES[world])
    for failure in FAILURES[world]:
        record(f"failure-{failure}", failing_rank, failure)
    record("unscaled-overflow", unscaled_overflow_rank)
    if world == 2:
        for method, mode, overflow in SCALED_CASES:
            record(scaled_key(method, mode, overflow), scaled_rank, method, mode, overflow)
        for kind in TASK_TRAINERS:
            record(f"scaled-{kind}", scaled_task_losses_rank, kind)
        record("resume", resume_rank, out_dir)
        record("bytes", bytes_rank)
        record("failure-mtl", failing_mtl_rank)
        record("mismatched-methods", mismatched_methods_rank)
        record("branch-per-rank", branch_per_rank_rank)
        record("mismatched-gramian-methods", mismatched_gramian_methods_rank)
        record("static-graph", static_graph_rank)
        record("first-step-failure", first_step_failure_rank)
        record("second-ddp-model", second_ddp_model_rank)
        record("plain-backward-first", plain_backward_first_rank)
        record("sparse-table", sparse_table_rank)
        record("batch-norm-buffers", batch_norm_buffers_rank)
    return results
