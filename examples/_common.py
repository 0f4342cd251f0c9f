"""Shared bits of the examples: sizes (small under JDOPTIM_SMALL=1) and synthetic data."""

from __future__ import annotations

import os

import torch
from torch import Tensor

SMALL = os.environ.get("JDOPTIM_SMALL") == "1"


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
