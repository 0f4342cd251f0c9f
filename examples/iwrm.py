"""Instance-wise risk minimisation: SGD vs JDSGD on the same data.

Each step is taken on a batch of per-instance losses. After the step we re-evaluate the same batch
and count how many of its losses went up. SGD follows the mean gradient, which may increase some
losses; JDSGD with UPGrad follows a direction that conflicts with none of them.

Run: .venv/bin/python examples/iwrm.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import copy

import torch
from _common import SMALL, progress, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import UPGradWeighting

torch.manual_seed(0)
n_batches, batch_size = (6, 16) if SMALL else (200, 32)
inputs, targets = regression_batches(n_batches, batch_size, n_features=10)
loss_fn = nn.MSELoss(reduction="none")

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
models = {"SGD": model, "JDSGD(UPGrad)": copy.deepcopy(model)}
optimizers = {
    "SGD": torch.optim.SGD(models["SGD"].parameters(), lr=0.05),
    "JDSGD(UPGrad)": JDSGD(
        models["JDSGD(UPGrad)"].parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0
    ),
}
increased = dict.fromkeys(models, 0)


def mean_loss(net: nn.Module) -> float:
    """Mean per-instance loss over all batches."""
    with torch.no_grad():
        return float(loss_fn(net(inputs).squeeze(-1), targets).mean())


initial_loss = mean_loss(model)
for x, y in progress(zip(inputs, targets, strict=True), n_batches, "training"):
    for name, net in models.items():
        optimizer = optimizers[name]

        def closure(
            net: nn.Module = net, optimizer: torch.optim.Optimizer = optimizer
        ) -> torch.Tensor:
            optimizer.zero_grad()
            return loss_fn(net(x).squeeze(-1), y)  # one loss per instance: shape [batch_size]

        if isinstance(optimizer, JDSGD):
            before = optimizer.step(closure)
        else:
            losses = closure()
            losses.mean().backward()
            before = losses.detach()
            optimizer.step()
        with torch.no_grad():
            after = loss_fn(net(x).squeeze(-1), y)
        increased[name] += int((after > before).sum())

total = n_batches * batch_size
print(
    f"{n_batches} steps on batches of {batch_size}; mean loss over all data before {initial_loss:.4f}"
)
for name, net in models.items():
    print(
        f"{name:>14}: mean loss after {mean_loss(net):.4f}; {increased[name]:5d} of {total} "
        f"({increased[name] / total:.0%}) per-instance losses increased by their own step"
    )
print(
    "UPGrad's direction decreases every loss of its batch to first order (more: examples/demo.py)."
)
