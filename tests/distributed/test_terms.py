"""The global Gramian from per-rank engine terms equals J Jᵀ of the concatenated batch.

The ranks are simulated in one process: each slice of the batch gets its own engine pass, and the
factors are concatenated the way ``Communicator.all_gather_padded`` concatenates them (zero-padded
to the largest size along every other dim). Ground truth: ``torch.func.jacrev`` Jacobians.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.autogram import Engine, concat_terms, gramian_from_terms


class SequenceModel(nn.Module):
    """Embedding, Linear at every position, LayerNorm, mean over positions: one loss per instance."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.linear(self.embedding(tokens))).tanh().mean(dim=(1, 2))


class Encoder(nn.Module):
    """A transformer encoder layer (self-attention closed form), mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).pow(2).mean(dim=(1, 2))


def _rank_terms(model: nn.Module, inputs: Tensor) -> list:
    terms = Engine(model, batch_dim=0).compute_terms(model(inputs))
    assert {term.route for _, term in terms} == {"closed_form"}  # factored, not exact rows
    return [term for _, term in terms]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # jacrev through attention
@pytest.mark.parametrize("kind", ["embedding", "transformer"])
def test_gathered_terms_give_the_gramian_of_the_concatenated_batch(kind: str) -> None:
    torch.manual_seed(0)
    model: nn.Module
    # Two "ranks" with different batch sizes and sequence lengths (each runs only its own).
    if kind == "embedding":
        model = SequenceModel().double()
        slices = [torch.randint(7, (3, 5)), torch.randint(7, (2, 4))]
    else:
        model = Encoder().double()
        slices = [
            torch.randn(3, 5, 8, dtype=torch.float64),
            torch.randn(2, 4, 8, dtype=torch.float64),
        ]
    per_rank_terms = [_rank_terms(model, tokens) for tokens in slices]
    gathered = concat_terms(per_rank_terms)
    gramian = gramian_from_terms(gathered, (5,), 0, torch.float64)

    params = dict(model.named_parameters())
    rows = []
    for tokens in slices:
        jacobian = jacrev(lambda p, t=tokens: functional_call(model, p, (t,)))(params)
        rows.append(torch.cat([j.reshape(tokens.shape[0], -1) for j in jacobian.values()], dim=1))
    full = torch.cat(rows)
    torch.testing.assert_close(gramian, full @ full.T, atol=1e-12, rtol=0.0)


def test_instance_major_rows_are_put_back_in_the_losses_layout() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    losses = model(x).T  # [T=2, B=4]: instances along dim 1
    engine = Engine(model, batch_dim=1)
    expected = engine.compute_gramian(losses)
    terms = [term for _, term in engine.compute_terms(losses)]
    gramian = gramian_from_terms(terms, (2, 4), 1, torch.float64)
    torch.testing.assert_close(gramian, expected, atol=1e-12, rtol=0.0)
