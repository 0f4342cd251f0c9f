"""IMTLL: impartial multi-task learning, loss-balance part (IMTL-L)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from jdoptim._stateful import Stateful
from jdoptim.scalarization._bases import Scalarizer, as_shape, check_value_shape


class IMTLL(Stateful, Scalarizer):
    """``Σᵢ (e^{sᵢ} Lᵢ - sᵢ)`` with learnable scales ``sᵢ``.

    Liu et al., *Towards Impartial Multi-task Learning* (ICLR 2021), loss balance (IMTL-L). At the
    optimum over ``sᵢ``, ``e^{sᵢ} Lᵢ = 1``: every scaled loss is kept at the same size. The ``- sᵢ``
    term prevents the trivial ``sᵢ → -∞``. The ``sᵢ`` (attribute :attr:`scales`, initialised to 0,
    so training starts from the plain sum) are ``nn.Parameter``: pass ``scalarizer.parameters()``
    to the optimizer. The paper's gradient-balance part (IMTL-G) needs per-task gradients and
    belongs to the aggregation layer.

    Args:
        shape: shape of the losses (an int ``n`` means ``(n,)``).
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.shape = as_shape(shape)
        self.scales = nn.Parameter(torch.zeros(self.shape))

    def forward(self, values: Tensor, /) -> Tensor:
        check_value_shape(values, self.shape, "IMTLL's scales")
        s = self.scales
        return (torch.exp(s) * values - s).sum()

    def reset(self) -> None:
        """Sets the scales back to 0 (the plain sum of the losses)."""
        super().reset()
        with torch.no_grad():
            self.scales.zero_()

    def _repr_args(self) -> str:
        return f"shape={list(self.shape)}"
