"""One exact IWRM step (JDSGD + UPGrad) on a ``fully_shard`` model vs the same model under DDP.

Two spawned gloo ranks (loopback, one thread each) train the same model on their slices of a
global batch; per mode: the median wall time of a step (the slowest rank's, steps separated by
barriers), the bytes each rank sent in the step's own collectives (counted by the optimizer,
the layers gathered during its backward passes among them; FSDP2's own parameter all-gathers in
the forward are computed: ``n (R - 1) / R``), what each rank stores between steps (parameters
and gradients, local shards only), and the most unsharded parameter bytes a rank held at once
during a step (sampled inside each layer's forward and in each backward pass through it; under
DDP every parameter is whole, always). Baselines: ``torch.optim.SGD`` on the mean loss, under DDP
and under FSDP2.

    python benchmarks/bench_fsdp.py               # R = 2, B = 32 per rank, 64-256-256-10
    python benchmarks/bench_fsdp.py --steps 20
    python benchmarks/bench_fsdp.py --depth 6     # 64-256-...-256-10, seven 256-wide layers
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDSGD
from jdoptim.aggregation import UPGradWeighting

MODES = ["ddp-sgd", "fsdp-sgd", "ddp-upgrad", "fsdp-upgrad"]
FEATURES, HIDDEN, CLASSES, POSITIONS = 64, 256, 10, 8


def model_for(mode: str, depth: int) -> tuple[nn.Module, nn.Module]:
    """The model to train and the wrapper to call (the same module under FSDP2): ``depth``
    hidden ``Linear`` layers after the first."""
    torch.manual_seed(0)
    widths = [FEATURES, *[HIDDEN] * (depth + 1)]
    modules: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        modules += [nn.Linear(width_in, width_out), nn.ReLU()]
    model = nn.Sequential(*modules, nn.Linear(HIDDEN, CLASSES))
    if mode.startswith("ddp"):
        return model, DistributedDataParallel(model)
    for layer in linears(model):
        fully_shard(layer)
    fully_shard(model)
    return model, model


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def stored_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        for t in (p, p.grad):
            if t is not None:
                local = t.to_local() if isinstance(t, DTensor) else t
                total += local.numel() * local.element_size()
    return total


class UnshardedPeak:
    """The most unsharded parameter bytes this rank holds at once, sampled inside each layer's
    forward (after FSDP2 gathered it) and in each backward pass through the layer."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.unsharded: dict[int, Tensor] = {}
        self.peak = 0
        self.handles = [layer.register_forward_pre_hook(self._in_layer) for layer in layers]

    def _in_layer(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        for param in module.parameters(recurse=False):  # the unsharded ones, during the forward
            self.unsharded[id(param)] = param
        self.sample()
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: self.sample())

    def sample(self) -> None:
        held = sum(p.untyped_storage().nbytes() for p in self.unsharded.values())
        self.peak = max(self.peak, held)


def run_mode(
    mode: str, batches: list[tuple[Tensor, Tensor]], part: slice, depth: int
) -> dict[str, Any]:
    model, wrapped = model_for(mode, depth)
    peak = UnshardedPeak(linears(model))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if mode.endswith("sgd"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        options: dict[str, Any] = {}
        if mode.startswith("ddp"):
            options["process_group"] = dist.group.WORLD
        optimizer = JDSGD(
            model.parameters(), lr=0.01, weighting=UPGradWeighting(), batch_dim=0, **options
        )
    times, sent = [], {}
    for index, (x, y) in enumerate(batches):
        x, y = x[part], y[part]
        dist.barrier()
        start = time.perf_counter()
        if mode.endswith("sgd"):
            sgd.zero_grad()
            loss_fn(wrapped(x).mean(dim=1), y).mean().backward()
            sgd.step()
        else:

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                return loss_fn(wrapped(x).mean(dim=1), y)

            optimizer.step(closure)
            sent = dict(optimizer.distributed.bytes_sent)
        slowest = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if index >= 2:
            times.append(float(slowest))
    n = sum(p.numel() for p in model.parameters())
    r = dist.get_world_size()
    if mode == "ddp-sgd":
        sent = {"all_reduce (DDP)": int(2 * n * 4 * (r - 1) / r)}
    if mode.startswith("fsdp"):  # FSDP2's own all-gathers: forward (+ backward for SGD)
        gathers = 2 if mode == "fsdp-sgd" else 1
        sent["all_gather (FSDP2)"] = int(gathers * n * 4 * (r - 1) / r)
        if mode == "fsdp-sgd":
            sent["reduce_scatter (FSDP2)"] = int(n * 4 * (r - 1) / r)
    for handle in peak.handles:
        handle.remove()
    return {
        "time": statistics.median(times),
        "sent": sent,
        "stored": stored_bytes(model),
        "n": n,
        "peak": peak.peak,
    }


def rank_main(
    rank: int, world: int, port: int, batch: int, steps: int, depth: int, out: str
) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch * world, POSITIONS, FEATURES, generator=generator),
            torch.randint(CLASSES, (batch * world,), generator=generator),
        )
        for _ in range(steps + 2)
    ]
    part = slice(rank * batch, (rank + 1) * batch)
    results = {mode: run_mode(mode, batches, part, depth) for mode in MODES}
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="instances per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-ups)")
    parser.add_argument("--depth", type=int, default=1, help="256 -> 256 layers after the first")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = 2
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(
            rank_main, args=(world, port, args.batch, args.steps, args.depth, out), nprocs=world
        )
        results = torch.load(Path(out) / "results.pt")
    n = results[MODES[0]]["n"]
    print(
        f"R = {world} ranks x B = {args.batch}, S = {POSITIONS} positions, depth {args.depth}, "
        f"n = {n} float32"
    )
    print(
        "| mode | step (slowest rank) | sent per rank per step | stored per rank "
        "| peak unsharded parameters per rank |"
    )
    print("|---|---|---|---|---|")
    for mode in MODES:
        result = results[mode]
        sent = result["sent"]
        detail = ", ".join(f"{kind} {size / 1e6:.3f}" for kind, size in sorted(sent.items()))
        print(
            f"| {mode} | {result['time'] * 1e3:.1f} ms | {sum(sent.values()) / 1e6:.3f} MB "
            f"({detail}) | {result['stored'] / 1e6:.3f} MB | {result['peak'] / 1e6:.3f} MB |"
        )


if __name__ == "__main__":
    main()
