from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from torch import Tensor

from jdoptim import JDSGD
from jdoptim._step_info import StepInfo
from jdoptim.aggregation import (
    CRMOGMWeighting,
    ExcessMTLWeighting,
    GradVacWeighting,
    GramianWeightedAggregator,
    MeanWeighting,
    MGDAWeighting,
    SDMGradWeighting,
    UPGradWeighting,
    WeightedAggregator,
)
from tests.aggregation._jacobians import gramian_sequence, jacobian_from_seed
from tests.aggregation._stateful_checks import (
    assert_reset_restarts,
    assert_resumes_identically,
    assert_state_follows_dtype,
)


def info(lr: float, step: int) -> StepInfo:
    return StepInfo(losses=torch.zeros(3), lr=lr, step=step, evaluate=lambda: torch.zeros(3))


def test_is_the_moving_average_of_the_inner_weights() -> None:
    matrices = gramian_sequence(5)
    weighting = CRMOGMWeighting(MGDAWeighting(), alpha=0.7)
    average = None
    for gramian in matrices:
        estimate = MGDAWeighting()(gramian)
        average = estimate if average is None else 0.7 * average + 0.3 * estimate
        torch.testing.assert_close(weighting(gramian), average)


def test_initial_weights_and_extreme_alphas() -> None:
    gramian = gramian_sequence(1)[0]
    initial = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    estimate = UPGradWeighting()(gramian)
    smoothed = CRMOGMWeighting(UPGradWeighting(), alpha=0.25, initial_weights=initial)(gramian)
    torch.testing.assert_close(smoothed, 0.25 * initial + 0.75 * estimate)
    frozen = CRMOGMWeighting(UPGradWeighting(), alpha=1.0, initial_weights=initial)
    for matrix in gramian_sequence(3):
        assert torch.equal(frozen(matrix), initial)
    plain = CRMOGMWeighting(UPGradWeighting(), alpha=0.0)
    for matrix in gramian_sequence(3):
        torch.testing.assert_close(plain(matrix), UPGradWeighting()(matrix))


def test_takes_the_input_of_the_wrapped_weighting() -> None:
    jacobian = jacobian_from_seed(1, 3, 5, rank=3)
    by_gramian = GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))
    torch.testing.assert_close(
        by_gramian(jacobian), UPGradWeighting()(jacobian @ jacobian.T) @ jacobian
    )
    by_matrix = WeightedAggregator(CRMOGMWeighting(ExcessMTLWeighting()))
    assert by_matrix(jacobian).shape == (5,)
    cross = CRMOGMWeighting(SDMGradWeighting())
    assert cross.input_kind == "cross_gramian"
    assert cross(torch.tensor([[1.0, 2.0], [0.0, 1.0]])).shape == (2,)
    with pytest.raises(TypeError, match="does not take a Gramian"):
        GramianWeightedAggregator(CRMOGMWeighting(ExcessMTLWeighting()))


def test_alpha_follows_the_learning_rate_through_after_step() -> None:
    weighting = CRMOGMWeighting(MGDAWeighting(), alpha=0.9, follow_lr=True)
    matrices = gramian_sequence(3)
    assert weighting.current_alpha == 0.9
    first = weighting(matrices[0])
    weighting.after_step(info(lr=0.1, step=1))
    assert weighting.current_alpha == 0.0  # lr at its initial value: no averaging
    torch.testing.assert_close(weighting(matrices[1]), MGDAWeighting()(matrices[1]))
    weighting.after_step(info(lr=0.025, step=2))
    assert weighting.current_alpha == pytest.approx(0.75)
    previous = MGDAWeighting()(matrices[1])
    expected = 0.75 * previous + 0.25 * MGDAWeighting()(matrices[2])
    torch.testing.assert_close(weighting(matrices[2]), expected)
    assert not torch.equal(first, expected)
    weighting.after_step(info(lr=float("nan"), step=3))  # an optimizer without a learning rate
    assert weighting.current_alpha == pytest.approx(0.75)
    fixed = CRMOGMWeighting(MGDAWeighting(), alpha=0.9)
    fixed.after_step(info(lr=0.01, step=1))
    assert fixed.current_alpha == 0.9


def test_after_step_and_reset_reach_the_wrapped_weighting() -> None:
    calls: list[int] = []

    class Recording(MeanWeighting):
        def after_step(self, step_info: StepInfo) -> None:
            calls.append(step_info.step)

    CRMOGMWeighting(Recording()).after_step(info(lr=0.1, step=4))
    assert calls == [4]
    inner = GradVacWeighting()
    weighting = CRMOGMWeighting(inner)
    weighting(gramian_sequence(1)[0])
    assert inner._state and weighting._state
    weighting.reset()
    assert not inner._state and not weighting._state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torchjd(dtype: torch.dtype) -> None:
    initial = torch.tensor([0.2, 0.3, 0.5], dtype=dtype)
    ours = CRMOGMWeighting(UPGradWeighting(), alpha=0.6, initial_weights=initial)
    theirs = peer.CRMOGMWeighting(peer.UPGradWeighting(), alpha=0.6, initial_weights=initial)
    for gramian in gramian_sequence(4, dtype=dtype):
        torch.testing.assert_close(ours(gramian), theirs(gramian), atol=1e-5, rtol=1e-5)


def test_state_round_trip_reset_and_dtype() -> None:
    matrices = gramian_sequence(6)

    def make() -> CRMOGMWeighting:
        weighting = CRMOGMWeighting(GradVacWeighting(), alpha=0.5, follow_lr=True)
        weighting.after_step(info(lr=0.2, step=1))
        weighting.after_step(info(lr=0.1, step=2))
        return weighting

    assert_resumes_identically(make, matrices, split=3)
    assert_reset_restarts(lambda: CRMOGMWeighting(GradVacWeighting(), alpha=0.5), matrices)
    assert_state_follows_dtype(lambda: CRMOGMWeighting(GradVacWeighting()), matrices)
    restored = CRMOGMWeighting(GradVacWeighting(), follow_lr=True)
    restored.load_state_dict(make().state_dict())
    assert restored.current_alpha == 0.5


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(TypeError, match="must be a Weighting"):
        CRMOGMWeighting(lambda g: g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be in"):
        CRMOGMWeighting(MeanWeighting(), alpha=1.5)
    with pytest.raises(ValueError, match="1-D"):
        CRMOGMWeighting(MeanWeighting(), initial_weights=torch.ones(2, 2))
    weighting = CRMOGMWeighting(MGDAWeighting(), initial_weights=torch.ones(2))
    with pytest.raises(ValueError, match="call reset"):
        weighting(torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        CRMOGMWeighting(MGDAWeighting())(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


def test_the_optimizer_drives_alpha_through_after_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    weighting = CRMOGMWeighting(MGDAWeighting(), follow_lr=True)
    optimizer = JDSGD(model.parameters(), lr=0.1, weighting=weighting)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = torch.randn(4, 3), torch.randn(4)

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses: Tensor = (model(x).squeeze(-1) - y) ** 2
        return losses

    alphas = []
    for _ in range(3):
        optimizer.step(closure)
        alphas.append(weighting.current_alpha)
        scheduler.step()
    # Steps were taken at lr 0.1, 0.05, 0.025.
    assert alphas == pytest.approx([0.0, 0.5, 0.75])


def test_setting_alpha_during_training_is_used_and_validated() -> None:
    weighting = CRMOGMWeighting(MGDAWeighting(), alpha=0.9)
    first = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    second = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    weighting(first)
    weighting.alpha = 0.0  # no averaging from now on
    torch.testing.assert_close(weighting(second), MGDAWeighting()(second))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        weighting.alpha = 1.5
    aggregator = GramianWeightedAggregator(CRMOGMWeighting(MGDAWeighting()))
    aggregator.alpha = 0.25
    assert aggregator.weighting.alpha == 0.25  # type: ignore[attr-defined]
