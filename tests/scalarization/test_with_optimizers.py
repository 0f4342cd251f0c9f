"""The after_step protocol end to end: a jdoptim optimizer drives FAMO and DWA like a hand loop."""

import torch
from torch import nn

from jdoptim.optim import JacobianDescent
from jdoptim.scalarization import DWA, FAMO


def _setup() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(13)
    return nn.Linear(3, 2), torch.randn(8, 3), torch.randn(8, 2)


def test_famo_through_the_optimizer_equals_the_hand_loop() -> None:
    model, x, y = _setup()
    twin = nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    famo, twin_famo = FAMO(2), FAMO(2)
    optimizer = JacobianDescent(torch.optim.SGD(model.parameters(), lr=0.1), scalarizer=famo)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return (model(x) - y).pow(2).mean(dim=0)

    for _ in range(4):
        optimizer.step(closure)
        twin_optimizer.zero_grad()
        twin_famo((twin(x) - y).pow(2).mean(dim=0)).backward()
        twin_optimizer.step()
        with torch.no_grad():
            twin_famo.update((twin(x) - y).pow(2).mean(dim=0))
    assert torch.allclose(famo.task_weights, twin_famo.task_weights)
    for ours, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(ours, theirs)


def test_dwa_epochs_follow_the_optimizer_steps() -> None:
    model, x, y = _setup()
    dwa = DWA(steps_per_epoch=2)
    optimizer = JacobianDescent(torch.optim.SGD(model.parameters(), lr=0.1), scalarizer=dwa)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return (model(x) - y).pow(2).mean(dim=0)

    for _ in range(4):
        optimizer.step(closure)
    state = dwa.state_dict()["_extra_state"]
    assert state["last_average"] is not None and state["previous_average"] is not None
    assert state["epoch_calls"] == 0


def test_mean_over_instances_accumulates_to_the_whole_batch_mean() -> None:
    """Per-instance losses (batch_dim set) on micro-batches of 5, 3 and 8: the step is torch's on
    the mean loss of the 16 instances. Adding the micro-batches' gradients made it about k times
    that (the sum of their means); Sum adds up as it should."""
    from jdoptim.scalarization import Mean, Sum

    for scalarizer, reduce in ((Mean(), torch.mean), (Sum(), torch.sum)):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
        reference = nn.Linear(3, 2).double()
        reference.load_state_dict(model.state_dict())
        optimizer = JacobianDescent(
            torch.optim.SGD(model.parameters(), lr=0.1), scalarizer=scalarizer, batch_dim=0
        )
        for xs, ys in zip(x.split([5, 3, 8]), y.split([5, 3, 8]), strict=True):
            optimizer.backward((model(xs)[:, 0] - ys) ** 2)
        reduce((reference(x)[:, 0] - y) ** 2).backward()
        for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            assert ours.grad is not None and theirs.grad is not None
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-14)
