"""UPGrad weights at batch scale: quadprog per row, the torch solvers, and TorchJD 0.18's UPGrad.

Side by side in one process, with interleaved repeats (every repeat calls each solver once, in
turn, so a load change on the shared CPU hits all of them alike; each repeat starts with the next
solver, so that none is always the first after the Gramian is built), medians and ratios. The Gramians
are ``J Jᵀ`` of a random ``J`` with ``n = 2m`` columns, of a rank-deficient ``J`` of rank ``m / 8``,
and (kinds ``mlp``, ``cnn``, ``transformer``) those of the per-instance cross-entropy losses of
``bench_autogram.py``'s models on a batch of ``m`` instances, as jdoptim's engine computes them.
A solver whose previous size, scaled by ``m⁴``, predicts one call over ``--limit`` seconds is
skipped and reported as such. Every jdoptim weighting is reset before each call (a cold
start) except ``auto-warm``, which keeps its state from call to call. Repeat ``t`` runs every
solver on step ``t`` of a slowly drifting Gramian sequence (``J_t = J_0 + 1e-3 · t · mean|J_0| · E``
with a fixed random ``E``), as consecutive training steps would give; for a model, step ``t`` is
a new batch, as in training on per-instance losses (so a warm start has little to reuse).
``active_set`` is the fixed-budget solver ``"auto"`` picks on CUDA.

    python benchmarks/bench_dual_cone.py            # m = 8 ... 1024, float32 and float64
    python benchmarks/bench_dual_cone.py --small    # m = 8, 32, 128: a quick run
    python benchmarks/bench_dual_cone.py --device cuda
    python benchmarks/bench_dual_cone.py --kinds mlp cnn transformer --sizes 32 64 128
    python benchmarks/bench_dual_cone.py --before /tmp/bp    # against an earlier version (see
                                                             # docs/performance.md)
    python benchmarks/bench_dual_cone.py --sizes 512 --kinds random --dtypes float64 \
        --without quadprog auto auto-warm active_set --limit 1000 --repeats 1  # the peer, m = 512
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim.aggregation import UPGradWeighting

Solver = Callable[[Tensor], Tensor]


def make_gramian(kind: str, size: int, dtype: torch.dtype, device: str, step: int = 0) -> Tensor:
    """Step ``t`` of a slowly drifting sequence: ``J_t = J_0 + 1e-3 · t · mean|J_0| · E``."""
    if kind in MODELS:
        return model_gramian(kind, size, step).to(dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(size)
    if kind == "random":
        jacobian = torch.randn(size, 2 * size, generator=generator, dtype=torch.float64)
    else:
        rank = max(size // 8, 1)
        factor = torch.randn(size, rank, generator=generator, dtype=torch.float64)
        jacobian = factor @ torch.randn(rank, 2 * size, generator=generator, dtype=torch.float64)
    direction = torch.randn(jacobian.shape, generator=generator, dtype=torch.float64)
    jacobian = jacobian + 1e-3 * step * jacobian.abs().mean() * direction
    gramian = jacobian @ jacobian.T
    return ((gramian + gramian.T) / 2).to(dtype=dtype, device=device)


MODELS = ("mlp", "cnn", "transformer")


def model_gramian(kind: str, size: int, step: int) -> Tensor:
    """The Gramian of a model's per-instance losses on batch ``step`` of ``size`` instances."""
    from bench_autogram import Case  # this folder, as when run as a script

    from jdoptim.autogram import Engine

    model, example = Case(kind, size).build()
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(example.shape, generator=generator)
    targets = torch.randint(0, 10, (size,), generator=generator)
    losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    return Engine(model, batch_dim=0).compute_gramian(losses).detach().to(torch.float64)


def synchronized(solver: Solver, device: str) -> Solver:
    def run(gramian: Tensor) -> Tensor:
        weights = solver(gramian)
        if device == "cuda":
            torch.cuda.synchronize()
        return weights

    return run


def cold(weighting: Any) -> Solver:
    def run(gramian: Tensor) -> Tensor:
        weighting.reset()
        return weighting(gramian)

    return run


def baseline(name: str) -> str:
    """What a compared solver's time is divided by: the warm default for a warm one."""
    return "auto-warm" if name.endswith("-warm") else "auto"


def time_call(solver: Solver, gramian: Tensor) -> tuple[float, Tensor]:
    start = time.perf_counter()
    weights = solver(gramian)
    return time.perf_counter() - start, weights


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "skipped"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="m = 8, 32, 128 and 3 repeats")
    parser.add_argument("--sizes", type=int, nargs="*", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=float, default=60.0, help="skip calls predicted longer")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="*", default=["random", "rank-deficient"])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    parser.add_argument("--without", nargs="*", default=[], help="solvers to leave out")
    parser.add_argument(
        "--before",
        help="folder holding an earlier jdoptim renamed jdoptim_before: adds its default UPGrad",
    )
    args = parser.parse_args()
    sizes = [8, 32, 128] if args.small else args.sizes
    repeats = 3 if args.small else args.repeats
    torch.set_num_threads(args.threads)

    solvers: dict[str, Solver] = {
        "quadprog": synchronized(cold(UPGradWeighting(solver="quadprog")), args.device),
        "batched": synchronized(cold(UPGradWeighting(solver="batched")), args.device),
        "active_set": synchronized(cold(UPGradWeighting(solver="active_set")), args.device),
        "auto": synchronized(cold(UPGradWeighting(solver="auto")), args.device),
        "auto-warm": synchronized(UPGradWeighting(solver="auto"), args.device),
    }
    if "torchjd" not in args.without:
        try:  # the peer is optional (the bench extra), and a GPU machine may lack it
            from torchjd.aggregation import UPGradWeighting as PeerUPGradWeighting
        except ImportError:
            print("torchjd is not installed: its column is left out")
        else:
            solvers["torchjd"] = synchronized(PeerUPGradWeighting(), args.device)
    if args.before:
        sys.path.insert(0, args.before)
        earlier = importlib.import_module("jdoptim_before.aggregation").UPGradWeighting
        # Cold like "auto" (an earlier version may keep a warm start too), and warm.
        solvers["before"] = synchronized(cold(earlier()), args.device)
        solvers["before-warm"] = synchronized(earlier(), args.device)
    for name in args.without:
        solvers.pop(name, None)
    print(f"device {args.device}, torch threads {args.threads}, {repeats} interleaved repeats")
    compared = [name for name in ("before", "torchjd", "quadprog") if name in solvers]
    if "before-warm" in solvers and "auto-warm" in solvers:
        compared.append("before-warm")
    header = "| Gramian | dtype | m | " + " | ".join(solvers) + " | "
    header += "".join(f"{name} / {baseline(name)} | " for name in compared) + "max rel. diff |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind in args.kinds:
        for dtype in [getattr(torch, name) for name in args.dtypes]:
            last: dict[str, tuple[int, float]] = {}
            for size in sizes:
                gramian = make_gramian(kind, size, dtype, args.device)
                solvers["auto"](gramian)  # warm-up: first-call allocations and dispatch
                for name in ("auto-warm", "before-warm"):
                    if name in solvers:
                        solvers[name](gramian)
                times: dict[str, list[float]] = {name: [] for name in solvers}
                weights: dict[str, Tensor] = {}
                skipped = set()
                for name in solvers:
                    if name in last:
                        previous_size, previous_time = last[name]
                        if previous_time * (size / previous_size) ** 4 > args.limit:
                            skipped.add(name)
                names = list(solvers)
                for repeat in range(repeats):
                    gramian = make_gramian(kind, size, dtype, args.device, step=repeat + 1)
                    # Each repeat starts with another solver: the first call after the Gramian is
                    # built (for the model kinds, a forward and a Gramian pass) finds colder caches.
                    start = repeat % len(names)
                    for name in names[start:] + names[:start]:
                        solver = solvers[name]
                        if name in skipped or (repeat > 0 and sum(times[name]) > args.limit):
                            continue
                        seconds, weights[name] = time_call(solver, gramian)
                        times[name].append(seconds)
                medians = {
                    name: statistics.median(times[name]) if times[name] else None
                    for name in solvers
                }
                for name, median in medians.items():
                    if median is not None:
                        last[name] = (size, median)
                reference = weights.get("quadprog", weights.get("before"))
                difference = "n/a"
                if reference is not None:
                    error = max(
                        float((weights[name] - reference).abs().max() / reference.abs().max())
                        for name in weights
                        if name != "torchjd"
                    )
                    difference = f"{error:.1e}"
                ratios = []
                for name in compared:
                    earlier, auto = medians.get(name), medians[baseline(name)]
                    ratios.append(
                        f"{earlier / auto:.3g}x"
                        if earlier is not None and auto is not None
                        else "n/a"
                    )
                cells = [format_seconds(medians[name]) for name in solvers]
                dtype_name = str(dtype).removeprefix("torch.")
                row = [kind, dtype_name, str(size), *cells, *ratios, difference]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
