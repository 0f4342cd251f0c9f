"""Adam-style Jacobian descent by composition: JDAdam, or JacobianDescent around any optimizer.

Run: .venv/bin/python examples/adam_composition.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import torch
from _common import SMALL, regression_batches
from torch import nn

from jdoptim import JacobianDescent, JDAdam
from jdoptim.aggregation import DualProjWeighting, UPGradWeighting

n_batches = 4 if SMALL else 100
inputs, targets = regression_batches(n_batches, batch_size=16, n_features=8)
loss_fn = nn.MSELoss(reduction="none")

for make in (
    lambda params: JDAdam(params, lr=1e-2, weighting=UPGradWeighting(), batch_dim=0),
    # Any torch optimizer composes the same way: here RMSprop with DualProj.
    lambda params: JacobianDescent(
        torch.optim.RMSprop(params, lr=1e-2), weighting=DualProjWeighting(), batch_dim=0
    ),
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = make(model.parameters())
    with torch.no_grad():
        before = float(loss_fn(model(inputs).squeeze(-1), targets).mean())
    for x, y in zip(inputs, targets, strict=True):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return loss_fn(model(x).squeeze(-1), y)

        optimizer.step(closure)
    with torch.no_grad():
        after = float(loss_fn(model(inputs).squeeze(-1), targets).mean())
    print(
        f"{optimizer.optimizer.__class__.__name__:>8} + {optimizer.method}: mean loss over all "
        f"data before {before:.4f}, after {after:.4f} ({n_batches} steps)"
    )
