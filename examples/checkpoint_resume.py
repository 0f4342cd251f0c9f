"""Save at step k, resume in fresh objects, and continue bit-identically.

The optimizer's state_dict holds the wrapped optimizer's state (Adam's moments), the weighting's
state, and the step count, so a resumed run equals the uninterrupted one exactly.

Run: .venv/bin/python examples/checkpoint_resume.py   (.venv: made by the quick start)
"""

from __future__ import annotations

import copy
import io

import torch
from _common import SMALL, regression_batches
from torch import nn

from jdoptim import JDAdam
from jdoptim.aggregation import UPGradWeighting

n_batches = 6 if SMALL else 40
inputs, targets = regression_batches(n_batches, batch_size=16, n_features=8)
loss_fn = nn.MSELoss(reduction="none")


def make_optimizer(model: nn.Module) -> JDAdam:
    return JDAdam(model.parameters(), lr=1e-2, weighting=UPGradWeighting(), batch_dim=0)


def train(model: nn.Module, optimizer: JDAdam, batches: range) -> None:
    for i in batches:

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return loss_fn(model(inputs[i]).squeeze(-1), targets[i])

        optimizer.step(closure)


torch.manual_seed(0)
initial = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

uninterrupted = copy.deepcopy(initial)
train(uninterrupted, make_optimizer(uninterrupted), range(n_batches))

interrupted = copy.deepcopy(initial)
optimizer = make_optimizer(interrupted)
half = n_batches // 2
train(interrupted, optimizer, range(half))
checkpoint = io.BytesIO()
torch.save({"model": interrupted.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)

checkpoint.seek(0)
saved = torch.load(checkpoint)
resumed = copy.deepcopy(initial)  # any fresh model with the same architecture
resumed.load_state_dict(saved["model"])
resumed_optimizer = make_optimizer(resumed)
resumed_optimizer.load_state_dict(saved["optimizer"])
train(resumed, resumed_optimizer, range(half, n_batches))

identical = all(
    torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True)
)
print(f"resumed run equals the uninterrupted run bit for bit: {identical}")
assert identical
