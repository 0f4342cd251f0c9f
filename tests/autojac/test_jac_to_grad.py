"""``jac_to_grad``: aggregation of ``.jac`` into ``.grad``, weights, memory-saving Gramian path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    Mean,
    MeanWeighting,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
)
from jdoptim.autojac import backward, jac_to_grad
from tests.autojac._models import jacobian_matrix, jacobian_rows, losses_of, make


class RowNormWeighting(Weighting):
    """A weighting of matrices (needs ``J`` itself): inverse row norms."""

    input_kind = "matrix"

    def forward(self, matrix: Tensor, /) -> Tensor:
        return 1 / (matrix.norm(dim=1) + 1)


class ColumnMax(Aggregator):
    """A non-weighted aggregator: the largest entry of each column."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return matrix.max(dim=0).values


def _model_with_jac() -> tuple[nn.Module, Tensor]:
    model, x, y = make("mlp")
    backward(losses_of(model, x, y))
    return model, jacobian_matrix(jacobian_rows(model, x, y))


def _grad_vector(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "aggregator",
    [UPGrad(), Mean(), WeightedAggregator(RowNormWeighting())],
    ids=["upgrad", "mean", "matrix-weighting"],
)
def test_weighted_aggregators_fill_grad_and_return_weights(aggregator: Aggregator) -> None:
    model, matrix = _model_with_jac()
    weights = jac_to_grad(model.parameters(), aggregator)
    assert isinstance(aggregator, WeightedAggregator)
    expected_weights = aggregator.compute_weights(matrix)
    assert weights is not None
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(_grad_vector(model), aggregator(matrix))
    assert not any(hasattr(p, "jac") for p in model.parameters())


class FirstRowWeights(GramianWeightedAggregator):
    """Overrides ``compute_weights`` to look at ``J`` itself, as ConFIG does."""

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

    def compute_weights(self, matrix: Tensor, /) -> Tensor:
        return matrix[:, 0].clone()


def test_gramian_aggregator_computing_weights_from_the_matrix_gets_the_matrix() -> None:
    model, matrix = _model_with_jac()
    weights = jac_to_grad(model.parameters(), FirstRowWeights())
    assert weights is not None
    torch.testing.assert_close(weights, matrix[:, 0])
    torch.testing.assert_close(_grad_vector(model), matrix[:, 0] @ matrix)


def test_plain_aggregator_returns_none() -> None:
    model, matrix = _model_with_jac()
    assert jac_to_grad(model.parameters(), ColumnMax()) is None
    torch.testing.assert_close(_grad_vector(model), matrix.max(dim=0).values)


def test_accumulates_into_existing_grad_and_retains_jac() -> None:
    model, matrix = _model_with_jac()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    jac_to_grad(model.parameters(), UPGrad(), retain_jac=True)
    torch.testing.assert_close(_grad_vector(model), UPGrad()(matrix) + 1)
    assert all(hasattr(p, "jac") for p in model.parameters())


def test_gramian_blocks_match_the_concatenated_jacobian() -> None:
    torch.manual_seed(0)
    blocks = [torch.randn(5, n, dtype=torch.float64) for n in (3, 1, 7)]
    aggregator = UPGrad()
    torch.testing.assert_close(
        aggregator.compute_weights_from_blocks(blocks),
        aggregator.compute_weights(torch.cat(blocks, dim=1)),
    )


@pytest.mark.parametrize("exponent", [-110, 90])
def test_extreme_entries_are_rescaled_across_params(exponent: int) -> None:
    # float32 J Jᵀ would underflow to zero (2^-220) or overflow (2^180) without the exact rescaling;
    # UPGrad is scale invariant, so the weights must match those of the unscaled Jacobian.
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    z = torch.zeros(2, requires_grad=True)  # an all-zero block must not spoil the scale
    matrix = torch.tensor(
        [[1.0, 0.0, 0.2, 0.0, 0.1], [-1.0, 1.0, 0.0, 0.3, 0.0], [0.0, -2.0, 1.0, 0.0, 0.5]]
    )
    jacobians = [matrix[:, :2], matrix[:, 2:], torch.zeros(3, 2)]
    for param, jacobian in zip([a, b, z], jacobians, strict=True):
        param.jac = jacobian * 2.0**exponent  # type: ignore[attr-defined]
    weights = jac_to_grad([a, b, z], UPGrad())
    expected = UPGradWeighting()(matrix @ matrix.T)
    assert not torch.allclose(expected, torch.full((3,), 1 / 3))  # the rows conflict
    assert weights is not None
    torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)


def test_errors_leave_grad_and_jac_untouched() -> None:
    model, _ = _model_with_jac()
    params = list(model.parameters())
    saved = [p.jac.clone() for p in params]  # type: ignore[attr-defined]
    params[0].grad = torch.zeros_like(params[0])
    params[2].jac = params[2].jac.clone()  # type: ignore[attr-defined]
    params[2].jac[0, 0, 0] = float("nan")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"Jacobian of params\[2\] contains NaN"):
        jac_to_grad(params, UPGrad())
    assert torch.equal(params[0].grad, torch.zeros_like(params[0]))
    assert all(p.grad is None for p in params[1:])
    assert torch.equal(params[0].jac, saved[0])  # type: ignore[attr-defined]
    assert all(hasattr(p, "jac") for p in params)


def test_missing_jac_mismatched_rows_and_wrong_shapes() -> None:
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    a.jac = torch.ones(4, 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) has no \.jac"):
        jac_to_grad([a, b], UPGrad())
    b.jac = torch.ones(5, 3)  # type: ignore[attr-defined]
    with pytest.raises(
        ValueError, match=r"different numbers of rows \(params\[0\]: 4, params\[1\]: 5\)"
    ):
        jac_to_grad([a, b], UPGrad())
    b.jac = torch.ones(4, 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"must have shape \[m, 3\]"):
        jac_to_grad([a, b], UPGrad())
    with pytest.raises(ValueError, match="at least one param"):
        jac_to_grad([], UPGrad())
    with pytest.raises(TypeError, match="Aggregator"):
        jac_to_grad([a], UPGradWeighting())  # type: ignore[arg-type]
    assert a.grad is None and b.grad is None


def test_unused_params_keep_no_grad() -> None:
    """As torch does, a param the losses do not depend on gets no .grad (not a zero one)."""
    used = torch.tensor([1.0, -2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    losses = torch.stack([used.square().sum(), (used * 3).sum()])
    backward(losses, inputs=[used, unused])
    jac_to_grad([used, unused], UPGrad())
    assert used.grad is not None and unused.grad is None
    assert not hasattr(unused, "jac")


def test_unused_params_keep_no_grad_with_jdoptim_backward_and_mtl_backward() -> None:
    from jdoptim import backward as aggregated_backward
    from jdoptim.autojac import mtl_backward

    used = torch.tensor([1.0, -2.0], requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    aggregated_backward(torch.stack([used.sum(), used.square().sum()]), Mean(), [used, unused])
    assert used.grad is not None and unused.grad is None

    trunk = torch.tensor([0.5, 1.5], requires_grad=True)
    idle = torch.ones(2, requires_grad=True)
    features = trunk * 2
    mtl_backward([features.sum(), features.square().sum()], features, shared_params=[trunk, idle])
    assert idle.jac is None  # type: ignore[attr-defined]
    jac_to_grad([trunk, idle], UPGrad())
    assert trunk.grad is not None and idle.grad is None


def test_param_without_requires_grad_is_rejected() -> None:
    frozen = torch.zeros(2)
    frozen.jac = torch.ones(3, 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(2,\)\) has requires_grad=False"):
        jac_to_grad([frozen], Mean())
    assert frozen.grad is None


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), WeightedAggregator(RowNormWeighting()), ColumnMax()], ids=str
)
def test_forward_hooks_of_the_aggregator_run_as_in_a_direct_call(aggregator: Aggregator) -> None:
    model, matrix = _model_with_jac()
    seen: list[Tensor] = []
    pre = aggregator.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    post = aggregator.register_forward_hook(lambda module, args, output: output * 2)
    try:
        weights = jac_to_grad(model.parameters(), aggregator)
    finally:
        pre.remove()
        post.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], matrix)
    torch.testing.assert_close(_grad_vector(model), 2 * aggregator(matrix))
    if isinstance(aggregator, WeightedAggregator):
        assert weights is not None
        torch.testing.assert_close(weights, aggregator.compute_weights(matrix))
    assert "compute_weights" not in vars(aggregator)
