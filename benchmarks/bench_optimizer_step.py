"""A whole optimizer step, JDSGD against SGD, side by side in one process (interleaved, medians).

Measures what the optimizer adds around the engine: the closure, the path's bookkeeping, the
weighting and the update. Ratios are to an SGD step on the mean loss of the same batch. Each repeat
takes the next of four batches (every method the same one), as in training.

    python benchmarks/bench_optimizer_step.py [--batch 128] [--repeats 30] [--before DIR]

``--before DIR`` adds ``jdsgd-upgrad-before``: the same step by another jdoptim, imported as
``jdoptim_before`` from ``DIR`` (a renamed copy, see docs/performance.md), side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_autogram import Batches  # this folder, as when run as a script
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import MeanWeighting, UPGradWeighting


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--before", default=None, help="a folder holding jdoptim_before")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = Batches(torch.randn(args.batch, 64))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    steps: dict[str, Callable[[], None]] = {}

    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

    def sgd_step() -> None:
        sgd.zero_grad()
        x, y = batches.current
        loss_fn(model(x), y).mean().backward()
        sgd.step()

    steps["sgd"] = sgd_step
    for name, weighting in (("jdsgd-mean", MeanWeighting()), ("jdsgd-upgrad", UPGradWeighting())):
        jd_model = _mlp()
        optimizer = JDSGD(jd_model.parameters(), lr=1e-3, weighting=weighting, batch_dim=0)

        def step(m: nn.Module = jd_model, o: JDSGD = optimizer) -> None:
            x, y = batches.current
            o.step(lambda: loss_fn(m(x), y))

        steps[name] = step
    if args.before:
        import importlib
        import sys

        sys.path.insert(0, args.before)
        before = importlib.import_module("jdoptim_before")
        before_weighting = importlib.import_module("jdoptim_before.aggregation").UPGradWeighting()
        before_model = _mlp()
        before_optimizer = before.JDSGD(
            before_model.parameters(), lr=1e-3, weighting=before_weighting, batch_dim=0
        )

        def before_step() -> None:
            x, y = batches.current
            before_optimizer.step(lambda: loss_fn(before_model(x), y))

        steps["jdsgd-upgrad-before"] = before_step
    for _ in range(3):
        batches.advance()
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        batches.advance()
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["sgd"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:14s} {median * 1e3:8.2f} ms  {median / base:6.2f}x SGD")


if __name__ == "__main__":
    main()
