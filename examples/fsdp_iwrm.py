"""Instance-wise risk minimisation on a model sharded with FSDP2 (``fully_shard``).

Every parameter is split over the ranks (each rank stores, updates and keeps optimizer state for
its shard only). JDSGD with UPGrad still takes the step one process would take on the whole
global batch: the weighting sees the Gramian of every rank's per-instance losses, and each rank's
``.grad`` is its shard of that step's direction. The optimizer finds the model from its forward
pass (no process_group= needed). The run ends by checkpointing with torch.distributed.checkpoint
and resuming.

Run (CPU, gloo):   torchrun --nproc_per_node 2 examples/fsdp_iwrm.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _common import SMALL, regression_batches
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from jdoptim import JDSGD
from jdoptim.aggregation import UPGradWeighting
from jdoptim.distributed import checkpoint_state, load_checkpoint_state

if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
    sys.exit(
        "This example runs on several processes, started by torchrun (which sets RANK and\n"
        "WORLD_SIZE). Run, for two processes on this machine:\n"
        "    torchrun --nproc_per_node 2 examples/fsdp_iwrm.py"
    )
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
if torch.cuda.is_available():
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build() -> tuple[nn.Module, JDSGD]:
    torch.manual_seed(0)  # the same initial parameters on every rank, then sharded
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)).to(DEVICE)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    # No process_group= needed: the model's first forward pass hands itself to the optimizer.
    optimizer = JDSGD(model.parameters(), lr=0.05, weighting=UPGradWeighting(), batch_dim=0)
    return model, optimizer


def train() -> None:
    """Trains on this rank's share, then checkpoints with DCP and resumes in fresh objects."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n_batches, local_batch, epochs = (4, 8, 2) if SMALL else (50, 32, 5)
    inputs, targets = regression_batches(n_batches, local_batch * world, n_features=10)
    dataset = TensorDataset(inputs.reshape(-1, 10), targets.reshape(-1))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler)
    loss_fn = nn.MSELoss(reduction="none")

    model, optimizer = build()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(DEVICE), y.to(DEVICE)

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                return loss_fn(model(x).squeeze(-1), y)  # this rank's losses: [local_batch]

            losses = optimizer.step(closure)  # the global batch's losses: [world * local_batch]
        if rank == 0:
            print(f"epoch {epoch}: mean loss of the last global batch {losses.mean():.4f}")

    weight = model[0].weight
    assert isinstance(weight, DTensor) and isinstance(weight.grad, DTensor)
    if rank == 0:
        print(f"rank 0 holds {tuple(weight.to_local().shape)} of the {tuple(weight.shape)} weight")

    # Every rank writes its shards; jdoptim's own small state (the same on every rank) goes once.
    directory = [tempfile.mkdtemp() if rank == 0 else ""]
    dist.broadcast_object_list(directory)
    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=directory[0])
    resumed_model, resumed_optimizer = build()
    state = checkpoint_state(resumed_model, resumed_optimizer)
    dcp.load(state, checkpoint_id=directory[0])
    load_checkpoint_state(resumed_model, resumed_optimizer, state)
    same = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True)
    )
    if rank == 0:
        print(f"{world} ranks, resumed from the checkpoint: {same}")


train()
# The models are gone before the group itself.
dist.barrier()
dist.destroy_process_group()
