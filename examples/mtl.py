"""Multi-task learning: a shared trunk, one head per task, one loss per task.

In multi-task mode the closure returns ``(losses, features)``: the ``[T]`` task losses and the
trunk's output. The trunk's parameters get the UPGrad combination of the task gradients; each head
gets its own task's gradient. No hand-written mtl_backward loop.

Run: .venv/bin/python examples/mtl.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import torch
from _common import SMALL, progress, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import UPGrad

n_batches = 4 if SMALL else 200
inputs, targets = regression_batches(n_batches, batch_size=32, n_features=10, n_outputs=2)

torch.manual_seed(0)
trunk = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
loss_fn = nn.MSELoss()

optimizer = JDSGD(
    [*trunk.parameters(), *heads.parameters()],
    lr=0.05,
    aggregator=UPGrad(),
    shared_params=trunk.parameters(),
    tasks_params=[head.parameters() for head in heads],
)


def task_losses() -> list[float]:
    """Each task's loss over all batches."""
    with torch.no_grad():
        features = trunk(inputs)
        return [
            round(float(loss_fn(head(features).squeeze(-1), targets[..., t])), 4)
            for t, head in enumerate(heads)
        ]


before = task_losses()
for x, y in progress(zip(inputs, targets, strict=True), n_batches, "training"):

    def closure() -> tuple[torch.Tensor, torch.Tensor]:
        optimizer.zero_grad()
        features = trunk(x)
        losses = torch.stack(
            [loss_fn(head(features).squeeze(-1), y[:, t]) for t, head in enumerate(heads)]
        )
        return losses, features

    losses = optimizer.step(closure)

print(f"task losses over all data: before {before}, after {task_losses()} ({n_batches} steps)")
