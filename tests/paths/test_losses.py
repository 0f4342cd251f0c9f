"""What a closure may return as losses."""

from __future__ import annotations

import pytest
import torch

from jdoptim.paths import NonFiniteLossesError, check_losses


def test_a_list_of_scalar_task_losses_is_stacked() -> None:
    w = torch.ones(2, requires_grad=True)
    losses, features = check_losses([w[0] * 2, w[1] * 3], multi_task=False)
    assert losses.shape == (2,) and features is None
    losses.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (3.0, TypeError, "reduction='none'"),
        ([torch.ones(2, requires_grad=True)] * 2, TypeError, "concatenate"),
        (torch.ones(2, requires_grad=False), ValueError, "require grad"),
        (torch.ones(0, requires_grad=True), ValueError, "are empty"),
        (torch.tensor([1.0, float("nan")], requires_grad=True), NonFiniteLossesError, "NaN"),
    ],
)
def test_bad_losses_get_an_error_that_says_what_to_do(result, error, match) -> None:
    with pytest.raises(error, match=match):
        check_losses(result, multi_task=False)


def test_multi_task_mode_needs_the_features() -> None:
    with pytest.raises(TypeError, match=r"\(losses, features\)"):
        check_losses(torch.ones(2, requires_grad=True), multi_task=True)
