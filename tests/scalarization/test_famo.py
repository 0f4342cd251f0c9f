import pytest
import torch
import torchjd.scalarization as peer
from torch import Tensor

from jdoptim._step_info import StepInfo
from jdoptim.scalarization import FAMO


def _logits(famo: FAMO) -> Tensor:
    logits: Tensor = famo.state_dict()["_extra_state"]["logits"]
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_gradient_is_the_papers_convex_combination(dtype: torch.dtype) -> None:
    famo = FAMO(3, min_losses=torch.tensor([0.0, 0.5, 0.0]))
    famo(torch.tensor([1.0, 2.0, 3.0], dtype=dtype))
    famo.update(torch.tensor([0.5, 1.9, 2.0], dtype=dtype))  # non-uniform task weights from here
    values = torch.tensor([0.8, 1.5, 2.5], dtype=dtype, requires_grad=True)
    result = famo(values)
    result.backward()
    z = famo.task_weights.to(dtype)
    gaps = values.detach() - torch.tensor([0.0, 0.5, 0.0], dtype=dtype) + 1e-8
    c = 1 / (z / gaps).sum()
    assert torch.allclose(values.grad, c * z / gaps)
    # The model's gradient Σᵢ (c zᵢ / Dᵢ) ∇Lᵢ is a convex combination of the task gradients.
    assert bool((values.grad > 0).all())
    assert values.grad.sum().item() == pytest.approx(1.0)
    assert result.item() == pytest.approx((c * (z * gaps.log()).sum()).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_is_adam_on_the_logits_along_the_softmax_gradient(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    famo = FAMO(4, lr=0.1, weight_decay=0.01)
    logits = torch.zeros(4, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.1, weight_decay=0.01)
    for _ in range(5):
        before, after = torch.rand(4, dtype=dtype) + 0.5, torch.rand(4, dtype=dtype) + 0.5
        famo(before)
        famo.update(after)
        # Ground truth: autograd of softmax(ξ)ᵀδ with δ = log Lbefore - log Lafter.
        improvement = ((before + 1e-8).log() - (after + 1e-8).log()).float()
        adam.zero_grad()
        (torch.softmax(logits, dim=0) @ improvement).backward()
        adam.step()
        assert torch.allclose(_logits(famo), logits.detach(), atol=1e-6)
    assert torch.allclose(famo.task_weights, torch.softmax(logits.detach(), dim=0), atol=1e-6)


def test_shifts_weight_towards_the_task_that_improved_least() -> None:
    famo = FAMO(2)
    for _ in range(10):
        famo(torch.tensor([1.0, 1.0]))
        famo.update(torch.tensor([0.5, 0.99]))
    weights = famo.task_weights
    assert weights[1] > weights[0]


def test_matches_the_peer_while_training_a_model() -> None:
    torch.manual_seed(11)
    features, targets = torch.randn(16, 3), torch.randn(16, 2)
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    scalarizers = [FAMO(2), peer.FAMO(2)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in models]
    for _ in range(5):
        results = []
        for model, scalarizer, optimizer in zip(models, scalarizers, optimizers, strict=True):
            losses = (model(features) - targets).pow(2).mean(dim=0)
            loss = scalarizer(losses)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                scalarizer.update((model(features) - targets).pow(2).mean(dim=0))
            results.append(loss.detach())
        assert torch.allclose(results[0], results[1], atol=1e-6)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_after_step_updates_from_the_evaluated_losses() -> None:
    by_protocol, by_hand = FAMO(2), FAMO(2)
    before, after = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.9])
    by_protocol(before)
    by_hand(before)
    by_protocol.after_step(StepInfo(losses=before, lr=0.1, step=1, evaluate=lambda: after))
    by_hand.update(after)
    assert torch.equal(_logits(by_protocol), _logits(by_hand))


def test_state_dict_into_a_fresh_instance_continues_bit_identically() -> None:
    torch.manual_seed(12)
    stream = [(torch.rand(2, 2) + 0.5, torch.rand(2, 2) + 0.4) for _ in range(8)]
    famo = FAMO([2, 2], lr=0.05)
    for before, after in stream[:4]:
        famo(before)
        famo.update(after)
    famo(stream[4][0])  # saved between the forward and the update: losses_before is state too
    fresh = FAMO([2, 2], lr=0.05)
    fresh.load_state_dict(famo.state_dict())
    fresh.update(stream[4][1])
    famo.update(stream[4][1])
    for before, after in stream[5:]:
        assert torch.equal(fresh(before), famo(before))
        fresh.update(after)
        famo.update(after)
    assert torch.equal(_logits(fresh), _logits(famo))


def test_to_moves_all_state_and_reset_clears_it() -> None:
    famo = FAMO(2)
    famo(torch.tensor([1.0, 2.0]))
    famo.update(torch.tensor([0.5, 1.9]))
    famo = famo.to(torch.float64)
    state = famo.state_dict()["_extra_state"]
    assert {state[k].dtype for k in ("logits", "exp_avg", "exp_avg_sq")} == {torch.float64}
    assert famo.min_losses.dtype == torch.float64
    famo.reset()
    assert torch.equal(famo.task_weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert famo.state_dict()["_extra_state"]["adam_steps"] == 0
    with pytest.raises(RuntimeError, match="needs the losses before the step"):
        famo.update(torch.ones(2))


def test_eval_mode_calls_do_not_replace_the_losses_before_the_step() -> None:
    famo, reference = FAMO(2), FAMO(2)
    famo(torch.tensor([1.0, 2.0]))
    reference(torch.tensor([1.0, 2.0]))
    famo.eval()
    famo(torch.tensor([5.0, 5.0]))
    famo.update(torch.tensor([0.5, 1.9]))
    reference.update(torch.tensor([0.5, 1.9]))
    assert torch.equal(_logits(famo), _logits(reference))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="min_losses has shape"):
        FAMO(2, min_losses=torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        FAMO(2, lr=-1.0)
    famo = FAMO(2, min_losses=torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="at least its min_losses entry"):
        famo(torch.tensor([0.4, 1.0]))
    with pytest.raises(ValueError, match="task logits has shape"):
        famo(torch.ones(3))
    famo(torch.ones(2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        famo.update(torch.tensor([1.0, float("nan")]))
    assert repr(FAMO(2)) == "FAMO(shape=[2], min_losses=None, lr=0.025, weight_decay=0.001)"
