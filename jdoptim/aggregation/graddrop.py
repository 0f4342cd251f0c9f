"""GradDrop: keeps, coordinate by coordinate, only the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import validators
from jdoptim.linalg import check_finite, check_tensor


def _identity(purity: Tensor) -> Tensor:
    return purity


def _checked_f(f: object) -> Callable[[Tensor], Tensor]:
    if not callable(f):
        raise TypeError(f"f must be a callable on tensors, got {type(f).__name__}.")
    return f


def _checked_leak(leak: Tensor | None) -> Tensor | None:
    if leak is None:
        return None
    check_tensor(leak, "leak")
    if leak.ndim != 1:
        raise ValueError(
            f"leak must be a 1-D tensor (one value per row), got shape {tuple(leak.shape)}."
        )
    check_finite(leak, "leak")
    if bool((leak < 0).any()) or bool((leak > 1).any()):
        raise ValueError("leak values must lie in [0, 1].")
    return leak.detach().clone()


class GradDrop(Aggregator):
    r"""Gradient sign dropout (Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout*, NeurIPS 2020, Algorithm 1, lines 10-15).

    For each coordinate ``j`` the positive sign purity ``Pⱼ = ½ (1 + Σᵢ Jᵢⱼ / Σᵢ |Jᵢⱼ|)`` is the
    share of the coordinate's total magnitude pushing it up. With ``Uⱼ ~ U(0, 1)``, the positive
    contributions are kept if ``f(Pⱼ) > Uⱼ`` and the negative ones otherwise, so all kept
    contributions to a coordinate share one sign. Row ``i`` then contributes
    ``ℓᵢ Jᵢⱼ + (1 - ℓᵢ) Mᵢⱼ Jᵢⱼ`` with the keep mask ``M`` and leak ``ℓ``; the result is the sum over
    rows. The mask acts per coordinate of ``J``, so there is no Gramian form. Draws from torch's
    global generator: ``torch.manual_seed`` makes it reproducible.

    Args:
        f: increasing map ``[0, 1] → [0, 1]`` applied to the purity (identity by default).
        leak: ``[m]`` values in ``[0, 1]``: how much of each row passes unmasked; ``None`` means 0.
    """

    differentiable = True

    leak: Tensor | None

    hyper_parameters = validators(
        f=_checked_f,
        leak=_checked_leak,
    )

    def __init__(
        self, f: Callable[[Tensor], Tensor] = _identity, leak: Tensor | None = None
    ) -> None:
        super().__init__()
        self.f = f
        self.register_buffer("leak", _checked_leak(leak), persistent=False)

    def forward(self, matrix: Tensor, /) -> Tensor:
        magnitude = matrix.abs().sum(dim=0)
        balance = torch.where(magnitude > 0, matrix.sum(dim=0) / magnitude, 0.0)
        purity = (1 + balance) / 2
        draws = torch.rand(matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        keep_positive = self.f(purity) > draws
        mask = torch.where(keep_positive, matrix > 0, matrix < 0).to(matrix.dtype)
        if self.leak is not None:
            if self.leak.shape[0] != matrix.shape[0]:
                raise ValueError(
                    f"leak has {self.leak.shape[0]} values but the Jacobian has "
                    f"{matrix.shape[0]} rows; give one leak per row."
                )
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device)[:, None]
            mask = leak + (1 - leak) * mask
        return (mask * matrix).sum(dim=0)

    def _repr_args(self) -> str:
        leak = "None" if self.leak is None else repr(self.leak.tolist())
        return f"f={getattr(self.f, '__name__', repr(self.f))}, leak={leak}"
