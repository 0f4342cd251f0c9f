"""What each method costs per step, and how fast it lowers the mean of per-instance losses.

Three small measurements behind the "which method when" guide of docs/methods.md:

* ``step``: milliseconds per ``JDSGD`` step on per-instance losses (an MLP 32→64→64→1, batch
  ``m``), for every method, against a plain ``torch.optim.SGD`` step on the mean loss. Gramian
  weightings run on the autogram engine (``batch_dim=0``); aggregators that need the Jacobian run on
  autojac. Medians over interleaved repeats.
* ``solver``: milliseconds per call of each weighting alone on a random ``[m, m]`` Gramian (rank
  ``m``, float32), for growing ``m``: the part of a step that grows with the number of losses.
* ``progress``: mean and worst training loss after ``k`` steps of each method on the same batches
  of 32 per-instance losses (lr 0.05), SGD for reference, and the length of each method's first
  direction relative to the mean gradient (methods differ in step length at equal lr).

    python benchmarks/bench_methods.py            # all three
    python benchmarks/bench_methods.py step --batch 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from jdoptim import JDSGD
from jdoptim.aggregation import (
    IMTLG,
    MGDA,
    AlignedMTLWeighting,
    CAGradWeighting,
    ConFIGWeighting,
    DualProjWeighting,
    FairGradWeighting,
    GradDrop,
    IMTLGWeighting,
    MeanWeighting,
    MGDAWeighting,
    NashMTLWeighting,
    PCGrad,
    PCGradWeighting,
    RandomWeighting,
    TrimmedMean,
    UPGradWeighting,
)
from jdoptim.autojac import jac

del IMTLG, MGDA, PCGrad  # only their weighting forms are timed

WEIGHTINGS: dict[str, Callable[[], object]] = {
    "Mean": MeanWeighting,
    "Random": RandomWeighting,
    "UPGrad": UPGradWeighting,
    "DualProj": DualProjWeighting,
    "MGDA": MGDAWeighting,
    "CAGrad(0.5)": lambda: CAGradWeighting(0.5),
    "IMTLG": IMTLGWeighting,
    "PCGrad": PCGradWeighting,
    "AlignedMTL": AlignedMTLWeighting,
    "ConFIG": ConFIGWeighting,
    "NashMTL": NashMTLWeighting,  # max_norm=1.0: the authors' clipping
    "FairGrad(1)": lambda: FairGradWeighting(alpha=1.0),
}
JACOBIAN_AGGREGATORS: dict[str, Callable[[], object]] = {
    "GradDrop": GradDrop,
    "TrimmedMean(1)": lambda: TrimmedMean(trim_number=1),
}


def make_problem(
    batch: int, steps: int, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 32, generator=generator)
    teacher = torch.randn(32, 1, generator=generator) / 32**0.5
    y = (torch.tanh(x @ teacher) + 0.1 * torch.randn(steps, batch, 1, generator=generator)).squeeze(
        -1
    )
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    return model, x, y


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name in WEIGHTINGS:
        return JDSGD(model.parameters(), lr=lr, weighting=WEIGHTINGS[name](), batch_dim=0)  # type: ignore[arg-type]
    return JDSGD(model.parameters(), lr=lr, aggregator=JACOBIAN_AGGREGATORS[name]())  # type: ignore[arg-type]


def one_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return (model(x).squeeze(-1) - y) ** 2

    if isinstance(optimizer, JDSGD):
        return optimizer.step(closure)
    losses = closure()
    losses.mean().backward()
    optimizer.step()
    return losses.detach()


def bench_step(batch: int, repeats: int) -> None:
    names = ["SGD", *WEIGHTINGS, *JACOBIAN_AGGREGATORS]
    model, x, y = make_problem(batch, steps=1)
    runs = {name: (copy.deepcopy(model),) for name in names}
    optimizers = {name: make_optimizer(name, runs[name][0], 1e-3) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        one_step(optimizers[name], runs[name][0], x[0], y[0])
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            one_step(optimizers[name], runs[name][0], x[0], y[0])
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["SGD"])
    print(f"step, batch {batch} (ms, median of {repeats}; x SGD):")
    for name in names:
        median = statistics.median(times[name])
        print(f"  {name:>15}: {1e3 * median:8.2f} ms  {median / base:6.1f}x")


def bench_solver(sizes: list[int], repeats: int) -> None:
    print("solver alone on a random [m, m] Gramian (ms per call, median):")
    print(f"  {'m':>15}: " + "".join(f"{m:>10}" for m in sizes))
    gramians = {}
    for m in sizes:
        generator = torch.Generator().manual_seed(m)
        jacobian = torch.randn(m, 2 * m, generator=generator)
        gramians[m] = jacobian @ jacobian.T
    for name, make in WEIGHTINGS.items():
        cells = []
        for m in sizes:
            weighting = make()
            weighting(gramians[m])  # type: ignore[operator]
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                weighting(gramians[m])  # type: ignore[operator]
                samples.append(time.perf_counter() - start)
                if samples[-1] > 2.0:
                    break
            cells.append(f"{1e3 * statistics.median(samples):10.2f}")
        print(f"  {name:>15}: " + "".join(cells))


def bench_progress(steps: list[int]) -> None:
    names = [
        "SGD",
        "UPGrad",
        "DualProj",
        "MGDA",
        "IMTLG",
        "PCGrad",
        "CAGrad(0.5)",
        "AlignedMTL",
        "ConFIG",
        "NashMTL",
        "FairGrad(1)",
    ]
    model, x, y = make_problem(32, steps=max(steps), seed=1)
    eval_x, eval_y = x.reshape(-1, 32), y.reshape(-1)
    print("mean (and worst) per-instance training loss after k steps, batch 32, lr 0.05;")
    print("length: the first step's direction ‖d‖ over the mean gradient's ‖ḡ‖ (same batch):")
    print(f"  {'k':>15}: " + "".join(f"{k:>18}" for k in steps) + f"{'length':>9}")
    params = list(model.parameters())
    rows = jac((model(x[0]).squeeze(-1) - y[0]) ** 2, params)
    jacobian = torch.cat([row.flatten(1) for row in rows], dim=1).detach()
    mean_norm = jacobian.mean(dim=0).norm()
    for name in names:
        net = copy.deepcopy(model)
        optimizer = make_optimizer(name, net, 0.05)
        cells = []
        for step in range(1, max(steps) + 1):
            try:
                one_step(optimizer, net, x[step - 1], y[step - 1])
            except ValueError:  # non-finite losses: the method's step is too long at this lr
                cells.append(f"{'diverged at ' + str(step):>18}")
                break
            if step in steps:
                with torch.no_grad():
                    losses = (net(eval_x).squeeze(-1) - eval_y) ** 2
                cells.append(f"{float(losses.mean()):>9.4f} ({float(losses.max()):5.2f})")
        if name == "SGD":
            length = 1.0
        else:
            weights = WEIGHTINGS[name]()(jacobian @ jacobian.T)  # type: ignore[operator]
            length = float((weights @ jacobian).norm() / mean_norm)
        cells += [" " * 18] * (len(steps) - len(cells))
        print(f"  {name:>15}: " + "".join(cells) + f"{length:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="*", default=["step", "solver", "progress"])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 100, 400])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "step" in args.what:
        for batch in args.batch:
            bench_step(batch, args.repeats)
    if "solver" in args.what:
        bench_solver(args.sizes, args.repeats)
    if "progress" in args.what:
        bench_progress(args.steps)


if __name__ == "__main__":
    main()
