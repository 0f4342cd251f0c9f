"""GradDrop: sign consistency per coordinate, the purity's probabilities, leak, peer values."""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as peer
from torch import Tensor

from jdoptim.aggregation import GradDrop
from tests.aggregation._jacobians import jacobian_from_seed

DTYPES = [torch.float32, torch.float64]


def signed_sums(jacobian: Tensor) -> tuple[Tensor, Tensor]:
    return jacobian.clamp(min=0).sum(dim=0), jacobian.clamp(max=0).sum(dim=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_coordinate_keeps_one_sign(dtype: torch.dtype) -> None:
    """Without leak, coordinate j is the sum of its positive or of its negative entries."""
    jacobian = jacobian_from_seed(0, 5, 200, rank=5, dtype=dtype)
    positive, negative = signed_sums(jacobian)
    torch.manual_seed(0)
    result = GradDrop()(jacobian)
    assert result.dtype == dtype
    is_positive = torch.isclose(result, positive)
    is_negative = torch.isclose(result, negative)
    assert (is_positive | is_negative).all()
    assert is_positive.any() and is_negative.any()


def test_hand_checked_case() -> None:
    jacobian = torch.tensor([[1.0, -1.0, 0.0], [1.0, 2.0, 0.0]])
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        result = GradDrop()(jacobian)
        # Column 0 never conflicts (purity 1) and column 2 is zero: both are deterministic.
        assert result[0] == 2.0 and result[2] == 0.0
        outcomes.add(float(result[1]))
    assert outcomes == {2.0, -1.0}


def test_positive_sign_is_kept_with_probability_f_of_the_purity() -> None:
    # Column purity P = ½ (1 + 2/4) = 3/4; with f(P) = P², positives are kept with probability 9/16.
    jacobian = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64).expand(3, 4000)
    torch.manual_seed(0)
    identity_share = (GradDrop()(jacobian) > 0).double().mean()
    squared_share = (GradDrop(f=lambda p: p**2)(jacobian) > 0).double().mean()
    # 4000 draws: the standard error of a share is below 0.008.
    assert float(identity_share) == pytest.approx(3 / 4, abs=0.03)
    assert float(squared_share) == pytest.approx(9 / 16, abs=0.03)


def test_leak_lets_a_share_of_each_row_through() -> None:
    jacobian = torch.tensor([[3.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    leak = torch.tensor([0.25, 1.0], dtype=torch.float64)
    torch.manual_seed(3)
    result = GradDrop(leak=leak)(jacobian)
    # Row 1 leaks fully: it always contributes; row 0 contributes ¼ plus ¾ when its sign is kept.
    row_0 = jacobian[0]
    candidates = [
        0.25 * row_0[j] + 0.75 * row_0[j] * keep + jacobian[1, j]
        for j in range(2)
        for keep in (0.0, 1.0)
    ]
    for j in range(2):
        assert any(torch.isclose(result[j], c) for c in candidates[2 * j : 2 * j + 2])
    torch.testing.assert_close(
        GradDrop(leak=torch.ones(2))(jacobian.float()), jacobian.float().sum(0)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_peer_for_the_same_seed(dtype: torch.dtype) -> None:
    jacobian = jacobian_from_seed(7, 4, 30, rank=3, dtype=dtype)
    leak = torch.tensor([0.0, 0.5, 0.1, 1.0], dtype=dtype)
    for kwargs in ({}, {"leak": leak}, {"f": torch.sqrt}):
        torch.manual_seed(11)
        ours = GradDrop(**kwargs)(jacobian)  # type: ignore[arg-type]
        torch.manual_seed(11)
        theirs = peer.GradDrop(**kwargs)(jacobian)  # type: ignore[arg-type]
        torch.testing.assert_close(ours, theirs)


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="callable"):
        GradDrop(f=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GradDrop(leak=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        GradDrop(leak=torch.ones(2, 2))
    with pytest.raises(ValueError, match="one leak per row"):
        GradDrop(leak=torch.ones(3))(torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        GradDrop()(torch.tensor([[1.0, float("inf")]]))
    assert repr(GradDrop()) == "GradDrop(f=_identity, leak=None)"
