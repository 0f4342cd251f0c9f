"""One distributed Jacobian-descent step on R gloo ranks vs one single-process step, same batch.

For each mode, R spawned ranks (loopback, gloo, one thread each) train the same model on their
slices of a global batch of ``R * B`` instances; one process then trains on the whole global
batch (one thread). Reported per mode: the median wall time of a step (distributed: the slowest
rank's, steps separated by barriers), the same on a process group of one rank in this process
(the distributed code path without communication or shared cores: its own overhead), the bytes
each rank sent in that step (counted by
:class:`jdoptim.distributed.Communicator`, ring algorithms), and, for comparison, the bytes an
all-gather of per-instance gradients (``[B, n]``, the naive exact scheme) would send.

Modes: ``sgd`` (the baseline: ``torch.optim.SGD`` on the mean loss, the model wrapped in
``DistributedDataParallel`` on R ranks; its bytes are DDP's gradient all-reduce, computed, not
counted), ``iwrm-upgrad`` (Gramian path: engine terms all-gathered in factored form),
``iwrm-mean`` (no Gramian needed: only the gradient all-reduce), ``iwrm-trimmed`` (full
Jacobian path: per-instance gradient rows all-gathered), ``mtl-upgrad`` (2 tasks: ``[T, n]``
shared Jacobian all-reduced).

    python benchmarks/bench_distributed.py                 # 2 ranks, B = 32 per rank
    python benchmarks/bench_distributed.py --ranks 3 --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
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
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDSGD
from jdoptim.aggregation import MeanWeighting, TrimmedMean, UPGradWeighting

MODES = ["sgd", "iwrm-upgrad", "iwrm-mean", "iwrm-trimmed", "mtl-upgrad"]
FEATURES, HIDDEN, CLASSES, POSITIONS = 64, 256, 10, 8


class SequenceMLP(nn.Module):
    """Linear layers on ``[B, S, d]`` sequences, mean-pooled: ``S`` positions per instance."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(HIDDEN, CLASSES), nn.Linear(HIDDEN, CLASSES)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.trunk(x).mean(dim=1)
        return torch.stack([head(features) for head in self.heads]), features


def data(total: int, steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(total, POSITIONS, FEATURES, generator=generator),
            torch.randint(CLASSES, (total,), generator=generator),
        )
        for _ in range(steps)
    ]


def build(mode: str, model: SequenceMLP, group: Any) -> JDSGD:
    options: dict[str, Any] = {"process_group": group}
    if mode == "iwrm-upgrad":
        options.update(weighting=UPGradWeighting(), batch_dim=0)
    elif mode == "iwrm-mean":
        options.update(weighting=MeanWeighting(), batch_dim=0)
    elif mode == "iwrm-trimmed":
        options.update(aggregator=TrimmedMean(1), batch_dim=0)
    else:
        options.update(weighting=UPGradWeighting(), shared_params=model.trunk.parameters())
    return JDSGD(model.parameters(), lr=0.01, **options)


def closure_for(mode: str, model: SequenceMLP, optimizer: JDSGD, x: Tensor, y: Tensor) -> Any:
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    def closure() -> Any:
        optimizer.zero_grad()
        logits, features = model(x)
        if mode.startswith("mtl"):
            return torch.stack([loss_fn(logits[t], y).mean() for t in range(2)]), features
        return loss_fn(logits[0], y)

    return closure


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    optimizer.zero_grad()
    logits, _ = model(x)
    nn.functional.cross_entropy(logits[0], y).backward()
    optimizer.step()


def run_mode(mode: str, batches: list[tuple[Tensor, Tensor]], part: slice, group: Any) -> Any:
    torch.manual_seed(0)
    model = SequenceMLP()
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "sgd":
        wrapped = DistributedDataParallel(model, process_group=group) if group else model
        sgd = torch.optim.SGD(model.parameters(), lr=0.01)
        times = []
        for x, y in batches:
            if group is not None:
                dist.barrier(group)
            start = time.perf_counter()
            sgd_step(wrapped, sgd, x[part], y[part])
            times.append(_slowest(time.perf_counter() - start, group))
        r = dist.get_world_size(group) if group else 1
        ddp_bytes = {"all_reduce (DDP)": int(n_params * 4 * 2 * (r - 1) / r)}
        return statistics.median(times[2:]), ddp_bytes, n_params
    optimizer = build(mode, model, group)
    times, sent = [], {}
    for index, (x, y) in enumerate(batches):
        closure = closure_for(mode, model, optimizer, x[part], y[part])
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        optimizer.step(closure)
        elapsed = _slowest(time.perf_counter() - start, group)
        if group is not None:
            assert optimizer.distributed is not None
            sent = optimizer.distributed.bytes_sent
        if index >= 2:  # warm-up steps
            times.append(elapsed)
    return statistics.median(times), sent, n_params


def _slowest(elapsed: float, group: Any) -> float:
    if group is None:
        return elapsed
    slowest = torch.tensor([elapsed])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return float(slowest)


def rank_main(rank: int, world: int, port: int, batch: int, steps: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    batches = data(batch * world, steps + 2)
    part = slice(rank * batch, (rank + 1) * batch)
    results = {mode: run_mode(mode, batches, part, dist.group.WORLD) for mode in MODES}
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="instances per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-ups)")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(args.ranks, port, args.batch, args.steps, out), nprocs=args.ranks)
        distributed = torch.load(Path(out) / "results.pt")
    torch.set_num_threads(1)
    batches = data(args.batch * args.ranks, args.steps + 2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    one_rank = {mode: run_mode(mode, batches, slice(None), dist.group.WORLD)[0] for mode in MODES}
    dist.destroy_process_group()
    r, b = args.ranks, args.batch
    print(f"R = {r} ranks x B = {b} instances (global batch {r * b}), S = {POSITIONS} positions")
    print(
        "| mode | 1 process, global batch | 1-rank group, global batch | R ranks "
        "| sent per rank per step | naive [B, n] all-gather |"
    )
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        local_time, _, n_params = run_mode(mode, batches, slice(None), None)
        dist_time, sent, _ = distributed[mode]
        naive = b * n_params * 4 * (r - 1)
        detail = ", ".join(f"{kind} {size / 1e6:.3f}" for kind, size in sorted(sent.items()))
        print(
            f"| {mode} | {local_time * 1e3:.1f} ms | {one_rank[mode] * 1e3:.1f} ms "
            f"| {dist_time * 1e3:.1f} ms | "
            f"{sum(sent.values()) / 1e6:.3f} MB ({detail}) | {naive / 1e6:.1f} MB |"
        )
    print(f"model: {n_params} parameters")


if __name__ == "__main__":
    main()
