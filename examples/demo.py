"""SGD vs JDSGD(UPGrad) on per-instance losses: how many losses does each step increase?

Both optimizers train the same network from the same initial weights on the same mini-batches,
with one loss per instance (``reduction="none"``). After every step we re-evaluate the batch the
step was taken on and count the losses that went up, and every few steps we measure the mean and
the worst per-instance loss on the whole training set. SGD follows the mean gradient, which may
increase some instances' losses; UPGrad picks a direction that decreases every loss of the batch
to first order.

Run: .venv/bin/python examples/demo.py   (bash scripts/demo.sh makes .venv and runs it)
Optional: ``pip install tqdm matplotlib`` for a progress bar and a plot (jdoptim_demo.png).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import SMALL, progress, regression_batches
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import UPGradWeighting

N_STEPS, BATCH_SIZE, N_TRAIN, LR = (12, 16, 64, 0.05) if SMALL else (1000, 32, 1024, 0.05)
EVALUATE_EVERY, TABLE_EVERY = (2, 4) if SMALL else (20, 100)


@dataclass
class Curve:
    """What one optimizer did: per step, and at every evaluation."""

    increased: list[float] = field(default_factory=list)  # fraction of the batch, per step
    steps: list[int] = field(default_factory=list)  # when the training set was evaluated
    mean_loss: list[float] = field(default_factory=list)
    worst_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


# The network is tiny: one thread is fastest, and several threads on a busy machine stall each other.
torch.set_num_threads(1)
torch.manual_seed(0)
inputs, targets = regression_batches(1, N_TRAIN, n_features=10)
inputs, targets = inputs[0], targets[0]
loss_fn = nn.MSELoss(reduction="none")
initial = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
batches = [torch.randint(N_TRAIN, (BATCH_SIZE,)) for _ in range(N_STEPS)]


def per_instance_losses(model: nn.Module, rows: torch.Tensor | slice) -> torch.Tensor:
    return loss_fn(model(inputs[rows]).squeeze(-1), targets[rows])


def evaluate(model: nn.Module, step: int, curve: Curve) -> None:
    with torch.no_grad():
        losses = per_instance_losses(model, slice(None))
    curve.steps.append(step)
    curve.mean_loss.append(float(losses.mean()))
    curve.worst_loss.append(float(losses.max()))


def train(name: str) -> Curve:
    model = copy.deepcopy(initial)
    if name == "SGD":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    else:
        optimizer = JDSGD(model.parameters(), lr=LR, weighting=UPGradWeighting(), batch_dim=0)
    curve = Curve()
    evaluate(model, 0, curve)
    start = time.perf_counter()
    for step, rows in enumerate(progress(batches, len(batches), name), start=1):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return per_instance_losses(model, rows)  # shape [BATCH_SIZE]

        if isinstance(optimizer, JDSGD):
            before = optimizer.step(closure)
        else:
            losses = closure()
            losses.mean().backward()  # what a usual training loop does
            optimizer.step()
            before = losses.detach()
        with torch.no_grad():
            after = per_instance_losses(model, rows)
        curve.increased.append(float((after > before).float().mean()))
        if step % EVALUATE_EVERY == 0:
            curve.seconds += time.perf_counter() - start
            evaluate(model, step, curve)
            start = time.perf_counter()
    return curve


def print_table(curves: dict[str, Curve]) -> None:
    names = list(curves)
    print(f"{'steps':>9} | " + " | ".join(f"{name:^30}" for name in names))
    columns = f"{'':>9} | " + " | ".join(
        f"{'increased':>10}{'mean':>10}{'worst':>10}" for _ in names
    )
    print(columns)
    print("-" * len(columns))
    print(
        f"{'start':>9} | "
        + " | ".join(
            f"{'':>10}{c.mean_loss[0]:>10.4f}{c.worst_loss[0]:>10.3f}" for c in curves.values()
        )
    )
    for begin in range(0, N_STEPS, TABLE_EVERY):
        end = min(begin + TABLE_EVERY, N_STEPS)
        cells = []
        for curve in curves.values():
            fraction = sum(curve.increased[begin:end]) / (end - begin)
            at = curve.steps.index(end)
            cells.append(
                f"{fraction:>10.1%}{curve.mean_loss[at]:>10.4f}{curve.worst_loss[at]:>10.3f}"
            )
        print(f"{begin + 1:>4}-{end:<4} | " + " | ".join(cells))
    print(
        "increased: share of the batch's losses that its own step increased (mean over the steps);\n"
        "mean, worst: mean and largest per-instance loss on the whole training set after the steps."
    )


def save_plot(curves: dict[str, Curve], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    window = max(1, TABLE_EVERY // 4)
    for name, curve in curves.items():
        increased = torch.tensor(curve.increased)
        smooth = increased.unfold(0, window, 1).mean(1) if len(increased) >= window else increased
        left.plot(range(window, window + len(smooth)), smooth * 100, label=name)
        middle.plot(curve.steps, curve.mean_loss, label=name)
        right.plot(curve.steps, curve.worst_loss, label=name)
    left.set(xlabel="step", ylabel="%", title="batch losses increased by their own step")
    middle.set(xlabel="step", ylabel="loss", title="mean training loss", yscale="log")
    right.set(xlabel="step", ylabel="loss", title="worst-instance training loss", yscale="log")
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


curves = {name: train(name) for name in ("SGD", "JDSGD(UPGrad)")}
print(
    f"{N_STEPS} steps of {BATCH_SIZE} per-instance losses (training set of {N_TRAIN}), lr={LR}, "
    f"same initial weights and batches\n"
)
print_table(curves)
sgd, upgrad = (sum(c.increased) / len(c.increased) for c in curves.values())
print(
    f"\nWhat it shows: SGD's steps increased {sgd:.1%} of the losses they were taken on, "
    f"JDSGD(UPGrad)'s {upgrad:.1%}.\n"
    "UPGrad's direction decreases every loss of the batch to first order; those that still go up\n"
    "do so because that guarantee holds for small enough steps, and a real step also has\n"
    "second-order effects (a smaller lr increases fewer)."
)
print(
    "Training time: " + ", ".join(f"{name} {curve.seconds:.1f} s" for name, curve in curves.items())
)
output = Path(os.environ.get("JDOPTIM_OUTPUT_DIR", ".")) / "jdoptim_demo.png"
if save_plot(curves, output):
    print(f"Plot: {output}")
else:
    print("Plot: skipped (pip install matplotlib, or the 'plot' extra, to get jdoptim_demo.png)")
