import math

import pytest
import torch
import torchjd.scalarization as peer

from jdoptim._step_info import StepInfo
from jdoptim.scalarization import DWA


def _info(step: int) -> StepInfo:
    return StepInfo(losses=torch.ones(2), lr=0.1, step=step, evaluate=lambda: torch.ones(2))


def _weights_by_hand(last: list[float], previous: list[float], temperature: float) -> list[float]:
    exps = [math.exp(a / b / temperature) for a, b in zip(last, previous, strict=True)]
    return [len(exps) * e / sum(exps) for e in exps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_follow_the_ratio_of_the_last_two_epoch_averages(dtype: torch.dtype) -> None:
    dwa = DWA(temperature=2.0)
    for epoch in ([[1.0, 2.0], [3.0, 2.0]], [[1.0, 2.0]]):  # averages [2, 2] then [1, 2]
        for losses in epoch:
            values = torch.tensor(losses, dtype=dtype, requires_grad=True)
            dwa(values).backward()
            assert torch.equal(values.grad, torch.ones(2, dtype=dtype))  # uniform at first
        dwa.step()
    values = torch.tensor([5.0, 7.0], dtype=dtype, requires_grad=True)
    result = dwa(values)
    result.backward()
    expected = _weights_by_hand([1.0, 2.0], [2.0, 2.0], 2.0)
    assert values.grad.tolist() == pytest.approx(expected)
    assert values.grad.sum().item() == pytest.approx(2.0)
    assert result.item() == pytest.approx(5 * expected[0] + 7 * expected[1])


def test_matches_the_peer_over_several_epochs() -> None:
    torch.manual_seed(7)
    ours, theirs = DWA(temperature=1.5), peer.DWA(temperature=1.5)
    for _ in range(5):
        for _ in range(3):
            values = torch.rand(2, 3) + 0.1
            assert torch.allclose(ours(values), theirs(values))
        ours.step()
        theirs.step()


def test_steps_per_epoch_ends_epochs_through_after_step() -> None:
    counted, manual = DWA(steps_per_epoch=2), DWA()
    torch.manual_seed(8)
    for step in range(1, 9):
        values = torch.rand(3) + 0.1
        assert torch.equal(counted(values), manual(values))
        counted.after_step(_info(step))
        if step % 2 == 0:
            manual.step()
    assert not torch.equal(counted.weights(values), torch.ones(3))
    DWA().after_step(_info(1))  # without steps_per_epoch, after_step leaves epochs to step()


def test_eval_mode_calls_are_not_recorded() -> None:
    dwa = DWA()
    dwa(torch.tensor([1.0, 2.0]))
    dwa.eval()
    dwa(torch.tensor([100.0, 200.0]))
    dwa.train()
    dwa.step()
    assert torch.equal(dwa.state_dict()["_extra_state"]["last_average"], torch.tensor([1.0, 2.0]))


def test_state_dict_into_a_fresh_instance_continues_bit_identically() -> None:
    torch.manual_seed(9)
    dwa = DWA(steps_per_epoch=3)
    stream = [torch.rand(4, dtype=torch.float64) + 0.1 for _ in range(20)]
    for step, values in enumerate(stream[:10], start=1):
        dwa(values)
        dwa.after_step(_info(step))
    fresh = DWA(steps_per_epoch=3)
    fresh.load_state_dict(dwa.state_dict())
    for step, values in enumerate(stream[10:], start=11):
        assert torch.equal(fresh(values), dwa(values))
        fresh.after_step(_info(step))
        dwa.after_step(_info(step))


def test_reset_forgets_the_history() -> None:
    dwa = DWA()
    for losses in ([1.0, 4.0], [1.0, 1.0]):
        dwa(torch.tensor(losses))
        dwa.step()
    assert not torch.equal(dwa.weights(torch.ones(2)), torch.ones(2))
    dwa.reset()
    assert torch.equal(dwa.weights(torch.ones(2)), torch.ones(2))
    with pytest.raises(RuntimeError, match="no losses were recorded"):
        dwa.step()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        DWA(temperature=0.0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        DWA(steps_per_epoch=0)
    dwa = DWA()
    dwa(torch.ones(2))
    with pytest.raises(ValueError, match="recorded this epoch"):
        dwa(torch.ones(3))
    assert repr(dwa) == "DWA(temperature=2, steps_per_epoch=None)"
