"""``nn.Embedding(sparse=True)``: exact Gramians, and sparse ``.grad`` as autograd gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error


class Tokens(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=sparse, padding_idx=1)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embedding(tokens)).tanh().mean(dim=(1, 2))


@pytest.mark.parametrize("batch_dim", [0, None])
def test_sparse_embedding(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = Tokens(sparse=True).double()
    dense = copy.deepcopy(model)
    dense.embedding.sparse = False
    tokens = torch.randint(10, (5, 3))
    engine = Engine(model, batch_dim=batch_dim)
    output = model(tokens)
    gramian = engine.compute_gramian(output)
    expected_output = dense(tokens)
    expected = loop_gramian(expected_output, list(dense.parameters()))
    assert relative_error(gramian, expected) <= 1e-10
    weights = torch.rand(5, dtype=torch.float64)
    engine.backward(weights)
    fused = model.embedding.weight.grad
    assert fused is not None and fused.is_sparse
    model.zero_grad(set_to_none=True)
    output.backward(weights)
    reference = model.embedding.weight.grad
    assert reference is not None and reference.is_sparse
    torch.testing.assert_close(fused.to_dense(), reference.to_dense())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # sparse grads are usable as usual
    optimizer.step()
