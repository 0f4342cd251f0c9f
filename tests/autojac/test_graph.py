"""Graph queries: default inputs and dependence checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim.aggregation import UPGrad
from jdoptim.autojac import backward
from jdoptim.autojac._graph import depends_on, reachable_leaves


def test_reachable_leaves_follow_parameter_order() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 1))
    frozen = nn.Linear(1, 1).requires_grad_(False)
    out = frozen(model(torch.randn(5, 3)))
    leaves = reachable_leaves([out])
    assert [id(t) for t in leaves] == [id(p) for p in model.parameters()]


def test_stop_at_hides_what_is_behind_it() -> None:
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 1)
    features = trunk(torch.randn(2, 3))
    leaves = reachable_leaves([head(features)], stop_at=[features])
    assert {id(t) for t in leaves} == {id(p) for p in head.parameters()}
    leaf = torch.ones(2, requires_grad=True)
    assert reachable_leaves([leaf * 2], stop_at=[leaf]) == []


def test_depends_on() -> None:
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    hidden = a * 3
    out = hidden.exp()
    assert depends_on(out, [a]) and depends_on(out, [hidden]) and depends_on(a, [a])
    assert not depends_on(out, [b])
    assert not depends_on(b * 2, [hidden])


def test_leaves_used_by_one_node_come_in_argument_order() -> None:
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    assert [id(t) for t in reachable_leaves([a * b])] == [id(a), id(b)]
    assert [id(t) for t in reachable_leaves([b * a])] == [id(b), id(a)]


def test_reached_by_is_structural() -> None:
    from jdoptim.autojac import reached_by

    used = torch.ones(2, requires_grad=True)
    zero_derivative = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    output = used.sum() + (zero_derivative * 0).sum()
    assert reached_by([output], [used, zero_derivative, unused]) == [True, True, False]


def test_an_aggregator_in_place_of_the_inputs_points_to_the_one_call_form() -> None:
    param = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"jdoptim\.backward\(tensors, aggregator\)"):
        backward(param * torch.randn(2, 3), UPGrad())  # type: ignore[arg-type]
