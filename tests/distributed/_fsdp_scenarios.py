"""What each rank runs in the ``fully_shard`` tests (module-level, so spawned processes import it).

As in ``_scenarios.py``, the global batches come from a fixed seed and rank ``r`` takes its
slice; the parameters a rank returns are the full tensors (its shards gathered), so they compare
with a single-process run on the concatenated batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from jdoptim import JDSGD, JDAdam
from jdoptim.aggregation import UPGradWeighting
from tests.distributed._scenarios import (
    iwrm_batches,
    iwrm_losses,
    iwrm_model,
    mtl_batches,
    mtl_model,
    slices,
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


def train_iwrm(model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice) -> Tensor:
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            return iwrm_losses(model, x[part], y[part])

        losses = optimizer.step(closure)
    return losses


def iwrm_rank(rank: int, world: int, sizes: list[int]) -> dict[str, Any]:
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    losses = train_iwrm(model, iwrm_batches(sum(sizes), STEPS), slices(sizes)[rank])
    return {"params": full_params(model), "losses": losses}


def iwrm_reference(sizes: list[int]) -> dict[str, Any]:
    model = iwrm_model()
    losses = train_iwrm(model, iwrm_batches(sum(sizes), STEPS), slice(None))
    return {"params": full_params(model), "losses": losses}


def routes_rank(rank: int, world: int) -> dict[str, Any]:
    """Which route the engine took for each parameter at the first and at the third step."""
    model = iwrm_model()
    model = shard(model, [model[0], model[3]])
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)
    routes = []
    for x, y in iwrm_batches(4 * world, STEPS):
        part = slices([4] * world)[rank]
        optimizer.step(lambda x=x, y=y: iwrm_losses(model, x[part], y[part]))
        engine = optimizer.distributed.engine()  # type: ignore[attr-defined]
        routes.append(sorted(set(engine._last_routes.values())))
    return {"routes": routes, "grad": type(next(model.parameters()).grad).__name__}


def train_tasks(model: nn.Module, batches: list[tuple[Tensor, Tensor]], part: slice) -> Tensor:
    """UPGrad on per-task losses (no batch_dim): the mean over each rank's instances per task."""
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting())
    losses = torch.empty(0)
    for x, y in batches:

        def closure() -> Tensor:
            optimizer.zero_grad()
            outputs, _ = model(x[part])
            return ((outputs - y[part]) ** 2).mean(dim=0)

        losses = optimizer.step(closure)
    return losses


def tasks_rank(rank: int, world: int, batch: int) -> dict[str, Any]:
    model = mtl_model()
    model = shard(model, [model.trunk[0], *model.heads])
    losses = train_tasks(model, mtl_batches(batch * world), slices([batch] * world)[rank])
    return {"params": full_params(model), "losses": losses}


def tasks_reference(world: int, batch: int) -> dict[str, Any]:
    model = mtl_model()
    losses = train_tasks(model, mtl_batches(batch * world), slice(None))
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
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    else:
        directory.mkdir(exist_ok=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            directory / f"rank{rank}.pt",
        )
    dist.barrier()
    model, optimizer = build()
    if how == "dcp":
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    else:
        saved = torch.load(directory / f"rank{rank}.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    run(model, optimizer, batches[2:])
    return {"straight": straight, "resumed": full_params(model)}
