"""Terms: factors, rebuilding around new factors, and exact concatenation of batches.

Ground truth: ``J Jᵀ`` of the concatenated batch, with ``J`` from ``torch.func.jacrev`` of each
batch (instances are independent, so the rows of the concatenated batch are the batches' rows).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.autogram import Engine, Term, concat_terms, grad_from_terms, gramian_from_terms
from jdoptim.autogram._terms import (
    BiasTerm,
    EmbeddingTerm,
    MaterializedTerm,
    OuterTerm,
    term_gramians,
)


class SequenceModel(nn.Module):
    """Embedding, Linear at every position, LayerNorm, mean over positions."""

    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.linear(self.embedding(tokens))).tanh().mean(dim=(1, 2))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x).pow(2).mean(dim=(1, 2))


class ConvModel(nn.Module):
    """Convolution and GroupNorm over a variable length, one loss per instance."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x)).sin().mean(dim=(1, 2))


def _batches(kind: str) -> tuple[nn.Module, list[Tensor]]:
    """A model and two batches of different sizes and sequence lengths."""
    torch.manual_seed(0)
    if kind.startswith("embedding"):
        # Padded positions get index 0, a real token too: their zero output gradients add nothing.
        model = SequenceModel(padding_idx=3 if kind == "embedding_padding_idx" else None)
        return model.double(), [torch.randint(7, (3, 5)), torch.randint(7, (2, 4))]
    if kind == "conv":
        shapes = [(3, 2, 6), (2, 2, 4)]
        return ConvModel().double(), [torch.randn(s, dtype=torch.float64) for s in shapes]
    shapes = [(3, 5, 8), (2, 4, 8)]
    return Encoder().double(), [torch.randn(s, dtype=torch.float64) for s in shapes]


def _jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    jacobian = jacrev(lambda p: functional_call(model, p, (inputs,)))(params)
    return torch.cat([j.reshape(inputs.shape[0], -1) for j in jacobian.values()], dim=1)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # jacrev through attention
@pytest.mark.parametrize("kind", ["embedding", "embedding_padding_idx", "conv", "transformer"])
def test_concatenated_terms_give_the_gramian_and_grad_of_the_concatenated_batch(kind: str) -> None:
    model, batches = _batches(kind)
    engine = Engine(model, batch_dim=0)
    pairs = [engine.compute_terms(model(inputs)) for inputs in batches]
    assert {term.route for p in pairs for _, term in p} == {"closed_form"}
    joined = concat_terms([[term for _, term in p] for p in pairs])
    gramian = gramian_from_terms(joined, (5,), 0)

    full = torch.cat([_jacobian(model, inputs) for inputs in batches])
    torch.testing.assert_close(gramian, full @ full.T, atol=1e-12, rtol=0.0)

    weights = torch.randn(5, dtype=torch.float64)
    params = [param for param, _ in pairs[0]]
    grad_from_terms(list(zip(params, joined, strict=True)), weights, 0)
    fused = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    order = {id(p): i for i, p in enumerate(model.parameters())}
    assert sorted(order[id(p)] for p in params) == list(range(len(order)))
    expected = weights @ full  # columns in model.parameters() order
    sizes = [p.numel() for p in model.parameters()]
    blocks = dict(zip(order.values(), expected.split(sizes), strict=True))
    torch.testing.assert_close(fused, torch.cat([blocks[order[id(p)]] for p in params]))


def test_one_batch_is_unchanged() -> None:
    term = MaterializedTerm(torch.randn(4, 3), (3,))
    (joined,) = concat_terms([[term]])
    assert torch.equal(joined.gramian(), term.gramian())


def _terms_of_each_type() -> list[Term]:
    torch.manual_seed(0)
    return [
        MaterializedTerm(torch.randn(6, 4), (2, 2)),
        OuterTerm(torch.randn(2, 3, 4, 5), torch.randn(3, 4, 6), (5, 6)),
        EmbeddingTerm(torch.randn(2, 3, 4, 5), torch.randint(7, (3, 4)), (7, 5)),
    ]


@pytest.mark.parametrize("term", _terms_of_each_type(), ids=lambda t: type(t).__name__)
def test_with_factors_rebuilds_the_same_term(term: Term) -> None:
    tensors = [tensor.clone() for tensor, _ in term.factors()]
    rebuilt = term.with_factors(tensors)
    assert type(rebuilt) is type(term)
    assert torch.equal(rebuilt.gramian(), term.gramian())
    assert all(new is old for (new, _), old in zip(rebuilt.factors(), tensors, strict=True))
    with pytest.raises(ValueError, match="factors"):
        term.with_factors(tensors[:-1] if len(tensors) > 1 else [])


@pytest.mark.parametrize("term", _terms_of_each_type(), ids=lambda t: type(t).__name__)
def test_instance_dim_of_each_factor_indexes_the_rows(term: Term) -> None:
    """Keeping the first instance of every factor keeps the first instance's rows of the Gramian."""
    first = term.with_factors([t.narrow(dim, 0, 1) for t, dim in term.factors()])
    rows = first.gramian().shape[0]
    torch.testing.assert_close(first.gramian(), term.gramian()[:rows, :rows])


def test_terms_of_different_types_are_rejected() -> None:
    a = MaterializedTerm(torch.randn(2, 6), (6,))
    b = OuterTerm(torch.randn(1, 2, 1, 2), torch.randn(2, 1, 3), (2, 3))
    with pytest.raises(ValueError, match="different types"):
        concat_terms([[a], [b]])
    with pytest.raises(ValueError, match="one term per parameter"):
        concat_terms([[a], [a, a]])


def _per_row_bias_and_weight(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row gradients written out: weight ``Σₛ a[t,i,s] ⊗ b[i,s]``, bias ``Σₛ a[t,i,s]``."""
    weight = torch.einsum("tbsk,bsd->btkd", a, b).reshape(a.shape[1] * a.shape[0], -1)
    bias = a.sum(dim=2).transpose(0, 1).reshape(a.shape[1] * a.shape[0], -1)
    return weight, bias


@pytest.mark.parametrize("tasks,positions", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_bias_term_and_its_fold_into_the_weight_term(tasks: int, positions: int) -> None:
    generator = torch.Generator().manual_seed(tasks * 10 + positions)
    a = torch.randn(tasks, 5, positions, 8, generator=generator, dtype=torch.float64)
    b = torch.randn(5, positions, 10, generator=generator, dtype=torch.float64)
    weight_rows, bias_rows = _per_row_bias_and_weight(a, b)
    weight, bias = OuterTerm(a, b, (8, 10)), BiasTerm(a, (8,))
    assert weight.form == "pairwise"
    torch.testing.assert_close(bias.gramian(), bias_rows @ bias_rows.T)
    weights = torch.randn(5, tasks, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(bias.weighted_grad(weights), weights.reshape(-1) @ bias_rows)

    # The same tensor a: one Gramian for both, the bias's slot empty; the sum is unchanged.
    folded = term_gramians([weight, bias])
    assert folded[1] is None and folded[0] is not None
    expected = weight_rows @ weight_rows.T + bias_rows @ bias_rows.T
    torch.testing.assert_close(folded[0], expected)
    # Another tensor with the same values, or a weight term in materialised form: no fold.
    apart = term_gramians([weight, BiasTerm(a.clone(), (8,))])
    assert all(g is not None for g in apart)
    torch.testing.assert_close(apart[0], weight_rows @ weight_rows.T)
    total = gramian_from_terms([weight, bias], (5, tasks), 0)
    separate = gramian_from_terms([weight, BiasTerm(a.clone(), (8,))], (5, tasks), 0)
    torch.testing.assert_close(total, separate)


def test_bias_fold_skips_materialized_weights_and_second_biases() -> None:
    generator = torch.Generator().manual_seed(3)
    # Many positions, few instances: the per-row gradients are cheaper than the pairwise kernel.
    a = torch.randn(1, 2, 40, 2, generator=generator, dtype=torch.float64)
    b = torch.randn(2, 40, 2, generator=generator, dtype=torch.float64)
    weight = OuterTerm(a, b, (2, 2))
    assert weight.form == "materialized"
    assert all(g is not None for g in term_gramians([weight, BiasTerm(a, (2,))]))
    pairwise = OuterTerm(a[:, :, :1], b[:, :1], (2, 2))
    first, second = BiasTerm(pairwise.a, (2,)), BiasTerm(pairwise.a, (2,))
    gramians = term_gramians([first, pairwise, second])
    assert gramians[0] is None and gramians[1] is not None and gramians[2] is not None
    with pytest.raises(ValueError, match="pairwise"):
        weight.gramian(with_bias=True)


def test_concatenated_terms_keep_a_bias_folded_with_its_weight() -> None:
    """Micro-batches (and ranks) are combined by concat_terms: a factor shared by a bias and its
    weight stays one tensor, so the combined Gramian is computed as the whole batch's, bit for
    bit (gradient accumulation must equal the whole-batch step exactly)."""
    generator = torch.Generator().manual_seed(5)
    whole_a = torch.randn(1, 6, 1, 8, generator=generator)
    whole_b = torch.randn(6, 1, 10, generator=generator)
    halves = [
        [OuterTerm(a, b, (8, 10)), BiasTerm(a, (8,))]
        for a, b in ((whole_a[:, :3].clone(), whole_b[:3]), (whole_a[:, 3:].clone(), whole_b[3:]))
    ]
    combined = concat_terms(halves)
    assert isinstance(combined[1], BiasTerm) and isinstance(combined[0], OuterTerm)
    assert combined[1].a is combined[0].a
    assert term_gramians(combined)[1] is None
    whole = [OuterTerm(whole_a, whole_b, (8, 10)), BiasTerm(whole_a, (8,))]
    assert torch.equal(gramian_from_terms(combined, (6,), 0), gramian_from_terms(whole, (6,), 0))
