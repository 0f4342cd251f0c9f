"""SDMGrad through step(closure): three independent batches per step, no hand-built J₁ J₂ᵀ.

SDMGrad's weighting needs ``A = J₁ J₂ᵀ`` from two independent batches and takes the step on a third.
With a cross-Gramian weighting the optimizer calls the closure three times per step; the closure
draws the next batch at each call.

Run: .venv/bin/python examples/sdmgrad.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import torch
from _common import SMALL, progress, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import SDMGradWeighting

n_steps = 3 if SMALL else 100
inputs, targets = regression_batches(3 * n_steps, batch_size=16, n_features=5)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
criterion = nn.MSELoss(reduction="none")
optimizer = JDSGD(model.parameters(), lr=0.01, weighting=SDMGradWeighting(lambda_=0.3))
batches = iter(zip(inputs, targets, strict=True))


def closure() -> torch.Tensor:
    optimizer.zero_grad()
    x, y = next(batches)  # a new, independent batch at each call
    return criterion(model(x).squeeze(-1), y)


def mean_loss() -> float:
    """Mean per-instance loss over all batches."""
    with torch.no_grad():
        return float(criterion(model(inputs).squeeze(-1), targets).mean())


before = mean_loss()
for _ in progress(range(n_steps), n_steps, "training"):
    losses = optimizer.step(closure)  # consumes three batches

print(f"mean loss over all data: before {before:.4f}, after {mean_loss():.4f} ({n_steps} steps)")
