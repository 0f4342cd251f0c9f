"""Instance-wise multi-task learning: one loss per instance *and* per task, shape [B, T].

The engine returns the generalized Gramian [B, T, T, B]; ``Flattening(UPGradWeighting())`` treats
the B·T losses as the objectives and returns weights of shape [B, T].

Run: .venv/bin/python examples/iwmtl.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import torch
from _common import SMALL, progress, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import Flattening, UPGradWeighting

n_batches = 4 if SMALL else 200
inputs, targets = regression_batches(n_batches, batch_size=16, n_features=10, n_outputs=3)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
loss_fn = nn.MSELoss(reduction="none")
optimizer = JDSGD(model.parameters(), lr=0.05, weighting=Flattening(UPGradWeighting()), batch_dim=0)


def per_task_mean_loss() -> list[float]:
    """Each task's mean loss over all instances of all batches."""
    with torch.no_grad():
        return [round(v, 4) for v in loss_fn(model(inputs), targets).mean((0, 1)).tolist()]


before = per_task_mean_loss()
for x, y in progress(zip(inputs, targets, strict=True), n_batches, "training"):

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return loss_fn(model(x), y)  # shape [16, 3]: instances x tasks

    losses = optimizer.step(closure)

print(f"each step weighed losses of shape {tuple(losses.shape)} (instances x tasks)")
print(f"mean loss per task over all data: before {before}, after {per_task_mean_loss()}")
