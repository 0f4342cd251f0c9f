"""``mtl_backward`` against the hand-written per-task computation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autojac import clear_jac, mtl_backward


class TwoTaskModel(nn.Module):
    """A trunk giving two feature tensors, a regression head and a classification-like head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.side = nn.Linear(4, 2)
        self.head_a = nn.Linear(5, 1)
        self.head_b = nn.Sequential(nn.Linear(5 + 2, 3), nn.ReLU(), nn.Linear(3, 2))

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        features = [self.trunk(x), self.side(x)]
        loss_a = self.head_a(features[0]).pow(2).mean()
        loss_b = self.head_b(torch.cat(features, dim=1)).sin().sum()
        return [loss_a, loss_b], features


def _setup() -> tuple[TwoTaskModel, Tensor, list[nn.Parameter], list[list[nn.Parameter]]]:
    torch.manual_seed(0)
    model = TwoTaskModel().double()
    shared = [*model.trunk.parameters(), *model.side.parameters()]
    heads = [list(model.head_a.parameters()), list(model.head_b.parameters())]
    return model, torch.randn(6, 4, dtype=torch.float64), shared, heads


def _hand_written(
    model: TwoTaskModel, x: Tensor, shared: list[nn.Parameter], heads: list[list[nn.Parameter]]
):  # type: ignore[no-untyped-def]
    losses, _ = model(x)
    shared_rows = []
    head_grads = []
    for loss, head in zip(losses, heads, strict=True):
        grads = torch.autograd.grad(loss, [*shared, *head], retain_graph=True, allow_unused=True)
        shared_rows.append(
            [
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(grads, shared, strict=False)
            ]
        )
        head_grads.append(grads[len(shared) :])
    jacobians = [torch.stack(rows) for rows in zip(*shared_rows, strict=True)]
    return jacobians, head_grads


@pytest.mark.parametrize("chunk", [1, None])
@pytest.mark.parametrize("explicit", [True, False])
def test_matches_hand_written_per_task_computation(chunk: int | None, explicit: bool) -> None:
    model, x, shared, heads = _setup()
    expected_jacobians, expected_head_grads = _hand_written(model, x, shared, heads)
    losses, features = model(x)
    if explicit:
        mtl_backward(
            losses, features, tasks_params=heads, shared_params=shared, parallel_chunk_size=chunk
        )
    else:
        mtl_backward(losses, features, parallel_chunk_size=chunk)
    for param, expected in zip(shared, expected_jacobians, strict=True):
        assert param.grad is None
        torch.testing.assert_close(param.jac, expected)  # type: ignore[attr-defined]
    for head, grads in zip(heads, expected_head_grads, strict=True):
        for param, expected in zip(head, grads, strict=True):
            assert not hasattr(param, "jac")
            torch.testing.assert_close(param.grad, expected)


def test_losses_as_a_tensor_and_single_feature_accumulate() -> None:
    torch.manual_seed(0)
    trunk = nn.Linear(3, 4).double()
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    x = torch.randn(5, 3, dtype=torch.float64)

    def run() -> tuple[Tensor, Tensor]:
        features = trunk(x).relu()
        return torch.stack([head(features).square().mean() for head in heads]), features

    losses, _ = run()
    expected = [
        torch.stack([torch.autograd.grad(loss, p, retain_graph=True)[0] for loss in losses])
        for p in trunk.parameters()
    ]
    head_grads = [
        torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
        for loss, h in zip(losses, heads, strict=True)
    ]
    for _ in range(2):
        losses, features = run()
        mtl_backward(losses, features, parallel_chunk_size=2)
    for param, rows in zip(trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(param.jac, 2 * rows)  # type: ignore[attr-defined]
    for head, grads in zip(heads, head_grads, strict=True):
        for param, grad in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(param.grad, 2 * grad)


def test_errors() -> None:
    model, x, shared, heads = _setup()
    losses, features = model(x)
    with pytest.raises(ValueError, match=r"losses\[0\] must be a scalar"):
        mtl_backward([losses[0].reshape(1), losses[1]], features)
    with pytest.raises(ValueError, match=r"losses\[1\].*does not require grad"):
        mtl_backward([losses[0], losses[1].detach()], features)
    with pytest.raises(ValueError, match="one iterable of params per loss"):
        mtl_backward(losses, features, tasks_params=heads[:1])
    with pytest.raises(ValueError, match=r"in both shared_params and tasks_params\[1\]"):
        mtl_backward(losses, features, tasks_params=[heads[0], [*heads[1], shared[0]]])
    with pytest.raises(ValueError, match=r"features\[0\].*does not require grad"):
        mtl_backward(losses, [torch.ones(3)])
    with pytest.raises(ValueError, match=r"shared_params\[0\].*does not require grad"):
        mtl_backward(losses, features, shared_params=[torch.ones(2)])
    assert not any(hasattr(p, "jac") or p.grad is not None for p in model.parameters())


def test_graph_is_freed_unless_retained() -> None:
    model, x, _, _ = _setup()
    losses, features = model(x)
    mtl_backward(losses, features, retain_graph=True, parallel_chunk_size=1)
    mtl_backward(losses, features, parallel_chunk_size=1)
    with pytest.raises(RuntimeError, match="second time"):
        mtl_backward(losses, features, parallel_chunk_size=1)


def test_grad_tensors_equal_the_scalar_losses_they_weigh() -> None:
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)
    x = torch.randn(6, 4)
    grads = [torch.randn(6, 3), torch.randn(6, 2)]

    features = trunk(x)
    mtl_backward([head_a(features), head_b(features)], features, grad_tensors=grads)
    got_jac = [p.jac.clone() for p in trunk.parameters()]  # type: ignore[attr-defined]
    got_grads = [p.grad.clone() for p in [*head_a.parameters(), *head_b.parameters()]]  # type: ignore[union-attr]
    clear_jac(trunk.parameters())
    for p in [*head_a.parameters(), *head_b.parameters()]:
        p.grad = None

    features = trunk(x)
    scalar = [(head_a(features) * grads[0]).sum(), (head_b(features) * grads[1]).sum()]
    mtl_backward(scalar, features)
    for got, p in zip(got_jac, trunk.parameters(), strict=True):
        torch.testing.assert_close(got, p.jac)  # type: ignore[attr-defined]
    for got, p in zip(got_grads, [*head_a.parameters(), *head_b.parameters()], strict=True):
        torch.testing.assert_close(got, p.grad)


def test_grad_tensors_must_match_the_tasks() -> None:
    trunk, head = nn.Linear(4, 5), nn.Linear(5, 3)
    features = trunk(torch.randn(6, 4))
    with pytest.raises(ValueError, match="one tensor per task"):
        mtl_backward([head(features)], features, grad_tensors=[])
    with pytest.raises(ValueError, match=r"must have the shape of losses\[0\]"):
        mtl_backward([head(features)], features, grad_tensors=[torch.ones(6, 2)])


def test_a_task_that_does_not_use_the_features_has_a_zero_trunk_row() -> None:
    """As in TorchJD: its head gets its gradient, the trunk's Jacobian a zero row (it was a
    ValueError, though what the user meant was clear)."""
    model, x, shared, _ = _setup()
    own = nn.Linear(3, 1).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    losses, features = model(x)
    mtl_backward([losses[0], own(z).pow(2).mean(), losses[1]], features)
    reference, _ = model(x)
    for param in shared:
        rows = [
            torch.autograd.grad(loss, param, retain_graph=True, allow_unused=True)[0]
            for loss in reference
        ]
        rows = [torch.zeros_like(param) if row is None else row for row in rows]
        expected = torch.stack([rows[0], torch.zeros_like(param), rows[1]])
        torch.testing.assert_close(param.jac, expected)  # type: ignore[attr-defined]
    own_grads = torch.autograd.grad(own(z).pow(2).mean(), list(own.parameters()))
    for param, grad in zip(own.parameters(), own_grads, strict=True):
        torch.testing.assert_close(param.grad, grad)


@pytest.mark.parametrize("given_heads", [False, True])
def test_a_loss_using_a_trunk_param_directly_gets_its_whole_gradient_rows(
    given_heads: bool,
) -> None:
    """An L2 penalty on the trunk inside a task's loss: the trunk's Jacobian rows missed it (the
    features' path alone), silently with disjoint tasks_params; without them the inference made
    the trunk weight a head param too and raised, naming tasks_params as the fix."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    trunk, heads = nn.Linear(5, 6), nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])

    def losses_of(weight: Tensor, bias: Tensor) -> Tensor:
        features = torch.tanh(x @ weight.T + bias)
        first = ((heads[0](features).squeeze(-1) - y[:, 0]) ** 2).mean() + 0.1 * weight.pow(2).sum()
        second = ((heads[1](features).squeeze(-1) - y[:, 1]) ** 2).mean()
        return torch.stack([first, second])

    expected = torch.func.jacrev(losses_of, argnums=(0, 1))(
        trunk.weight.detach(), trunk.bias.detach()
    )
    features = torch.tanh(trunk(x))
    first = ((heads[0](features).squeeze(-1) - y[:, 0]) ** 2).mean() + 0.1 * trunk.weight.pow(
        2
    ).sum()
    second = ((heads[1](features).squeeze(-1) - y[:, 1]) ** 2).mean()
    tasks = [list(heads[0].parameters()), list(heads[1].parameters())] if given_heads else None
    mtl_backward([first, second], features, tasks_params=tasks)
    torch.testing.assert_close(trunk.weight.jac, expected[0])  # type: ignore[attr-defined]
    torch.testing.assert_close(trunk.bias.jac, expected[1])  # type: ignore[attr-defined]
    head_grad = torch.autograd.grad(
        ((heads[0](torch.tanh(trunk(x))).squeeze(-1) - y[:, 0]) ** 2).mean(), heads[0].weight
    )[0]
    torch.testing.assert_close(heads[0].weight.grad, head_grad)
