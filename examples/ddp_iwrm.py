"""Instance-wise risk minimisation on several processes with DistributedDataParallel.

Each rank draws its share of every global batch (DistributedSampler); JDSGD with UPGrad then takes
the step that one process would take on the whole global batch: the weighting sees the Gramian of
all per-instance losses of all ranks, and every rank ends each step with the same parameters.

Run (CPU, gloo):   .venv/bin/torchrun --nproc_per_node 2 examples/ddp_iwrm.py
Several machines:  torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d \
                       --rdzv_endpoint HOST:29500 examples/ddp_iwrm.py   (on every machine)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from _common import SMALL, regression_batches
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from jdoptim import JDSGD
from jdoptim.aggregation import UPGradWeighting

if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
    sys.exit(
        "This example runs on several processes, started by torchrun (which sets RANK and\n"
        "WORLD_SIZE). Run, for two processes on this machine:\n"
        "    torchrun --nproc_per_node 2 examples/ddp_iwrm.py"
    )
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def train() -> None:
    """Trains on this rank's share and checks that every rank ends with the same parameters."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    )

    n_batches, local_batch, epochs = (4, 8, 2) if SMALL else (50, 32, 5)
    inputs, targets = regression_batches(n_batches, local_batch * world, n_features=10)
    dataset = TensorDataset(inputs.reshape(-1, 10), targets.reshape(-1))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler)
    loss_fn = nn.MSELoss(reduction="none")

    torch.manual_seed(0)  # DDP also broadcasts rank 0's initial parameters
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)).to(device)
    )
    # No process_group= needed: the DDP model's first forward pass hands its group to the optimizer,
    # every step is exact on the global batch, and DDP's own gradient sync is switched off.
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0)

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                return loss_fn(model(x).squeeze(-1), y)  # this rank's losses: [local_batch]

            losses = optimizer.step(closure)  # the global batch's losses: [world * local_batch]
        if rank == 0:
            print(f"epoch {epoch}: mean loss of the last global batch {losses.mean():.4f}")

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        print(f"{world} ranks, identical parameters: {all(torch.equal(c, flat) for c in copies)}")


train()
# The model (and its reducer's hold on the group) is gone before the group itself.
dist.barrier()
dist.destroy_process_group()
