"""UW: uncertainty weighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from jdoptim._stateful import Stateful
from jdoptim.scalarization._bases import Scalarizer, as_shape, check_value_shape


class UW(Stateful, Scalarizer):
    """``Σᵢ (½ e^{-sᵢ} Lᵢ + ½ sᵢ)`` with learnable log-variances ``sᵢ = log σᵢ²``.

    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics* (CVPR 2018): the negative log-likelihood of Gaussian outputs with task
    noise ``σᵢ``, ``Lᵢ / (2σᵢ²) + log σᵢ``. Minimising over ``sᵢ`` gives ``e^{sᵢ} = Lᵢ``, so each
    loss is weighted by the inverse of its own size. The ``sᵢ`` (attribute :attr:`log_variances`,
    initialised to 0) are ``nn.Parameter``: pass ``scalarizer.parameters()`` to the optimizer.

    Args:
        shape: shape of the losses (an int ``n`` means ``(n,)``).
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = as_shape(shape)
        self.log_variances = nn.Parameter(torch.zeros(self.shape))

    def forward(self, values: Tensor, /) -> Tensor:
        check_value_shape(values, self.shape, "UW's log_variances")
        s = self.log_variances
        return (0.5 * torch.exp(-s) * values + 0.5 * s).sum()

    def reset(self) -> None:
        """Sets the log-variances back to 0 (unit variances: all losses weighted ½)."""
        super().reset()
        with torch.no_grad():
            self.log_variances.zero_()

    def _repr_args(self) -> str:
        return f"shape={list(self.shape)}"
