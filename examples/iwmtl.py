"""Instance-wise multi-task learning: one loss per instance *and* per task, shape [B, T].

The engine returns the generalized Gramian [B, T, T, B]; ``Flattening(UPGradWeighting())`` treats
the B·T losses as the objectives and returns weights of shape [B, T].

Run: python examples/iwmtl.py
"""

from __future__ import annotations

import torch
from _common import SMALL, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import Flattening, UPGradWeighting

n_batches = 4 if SMALL else 200
inputs, targets = regression_batches(n_batches, batch_size=16, n_features=10, n_outputs=3)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
loss_fn = nn.MSELoss(reduction="none")
optimizer = JDSGD(model.parameters(), lr=0.05, weighting=Flattening(UPGradWeighting()), batch_dim=0)

for x, y in zip(inputs, targets, strict=True):

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return loss_fn(model(x), y)  # shape [16, 3]: instances x tasks

    losses = optimizer.step(closure)

print(f"losses shape {tuple(losses.shape)}, final mean per task: {losses.mean(0).tolist()}")
