"""Modules with sparse gradients are rejected with a message naming them, on the Jacobian path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDSGD
from jdoptim.aggregation import TrimmedMean


def test_sparse_embedding_on_the_jacobian_path_is_rejected_before_any_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(6, 1))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = JDSGD(model.parameters(), lr=0.1, aggregator=TrimmedMean(trim_number=1))
    indices = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses: Tensor = model(indices).squeeze(-1).square()
        return losses

    with pytest.raises(ValueError, match=r"Embedding with sparse gradients.*sparse=False"):
        optimizer.step(closure)
    for param, saved in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, saved) and param.grad is None
