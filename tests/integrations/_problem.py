"""A small float32 regression problem shared by the trainer-integration tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

BATCH = 8


def make_net(outputs: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, outputs))


def make_data(size: int = 32, outputs: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(size, 5, generator=generator)
    targets = torch.randn(size, outputs, generator=generator).squeeze(-1)
    return inputs, targets


def instance_losses(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One loss per instance: ``[B]``."""
    return (net(x).squeeze(-1) - y) ** 2


def task_losses(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One mean loss per output (task): ``[T]``."""
    return ((net(x) - y) ** 2).mean(dim=0)


def batches(inputs: Tensor, targets: Tensor, size: int = BATCH) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches an unshuffled ``DataLoader`` yields, repeated epoch after epoch."""
    while True:
        for start in range(0, len(inputs), size):
            yield inputs[start : start + size], targets[start : start + size]


def loader(inputs: Tensor, targets: Tensor, size: int = BATCH) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=size
    )


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
