"""Shared bits of the examples: sizes (small under JDOPTIM_SMALL=1), synthetic data, progress."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

SMALL = os.environ.get("JDOPTIM_SMALL") == "1"
T = TypeVar("T")


def regression_batches(
    n_batches: int, batch_size: int, n_features: int, n_outputs: int = 1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Noisy targets of a fixed random two-layer network, so there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n_batches, batch_size, n_features, generator=generator)
    hidden = torch.randn(n_features, 16, generator=generator) / n_features**0.5
    readout = torch.randn(16, n_outputs, generator=generator)
    targets = torch.tanh(inputs @ hidden) @ readout
    targets = targets + 0.1 * torch.randn(targets.shape, generator=generator)
    return inputs, targets.squeeze(-1) if n_outputs == 1 else targets


def progress(iterable: Iterable[T], total: int, description: str) -> Iterator[T]:
    """A tqdm progress bar when tqdm is installed (``pip install tqdm``), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=description, leave=False, disable=SMALL)
