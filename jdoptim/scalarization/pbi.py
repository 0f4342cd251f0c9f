"""PBI: penalty-based boundary intersection."""

from __future__ import annotations

from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.linalg import power_of_two_scale
from jdoptim.scalarization._bases import (
    PreferenceScalarizer,
    check_number,
    numbers_table,
)

# Added under the square root of d₂ so that its gradient stays finite when the losses lie exactly
# on the preference direction (d₂ = 0); it shifts the result by at most 1e-6 there.
_D2_EPS = 1e-12


class PBI(PreferenceScalarizer):
    """``d₁ + θ d₂`` with ``d₁ = (L - z*)ᵀŵ`` and ``d₂ = ‖(L - z*) - d₁ ŵ‖``, ``ŵ = w / ‖w‖``.

    Zhang & Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition* (IEEE TEVC
    2007). ``d₁`` is the progress along the preference direction, ``d₂`` the distance
    to it; ``θ`` trades them off (the paper uses 5).

    Args:
        theta: penalty ``θ ≥ 0`` on ``d₂``.
        weights: preference ``w`` (non-negative, shape of the losses).
        reference: ideal point ``z*`` (a lower bound of the losses); ``None``: the origin.
    """

    hyper_parameters = numbers_table(theta=False)

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        if weights is None:
            raise TypeError("PBI needs weights: a preference tensor with one entry per loss.")
        super().__init__(weights, reference)
        self.theta = check_number(theta, "theta", positive=False)

    def forward(self, values: Tensor, /) -> Tensor:
        if self.weights is None:
            raise TypeError("PBI needs weights: a preference tensor with one entry per loss.")
        direction = self._matched(self.weights, values, "weights").flatten()
        direction = direction / direction.norm()
        shifted = self._shifted(values).flatten()
        d1: Tensor = shifted @ direction
        residual = shifted - d1 * direction
        # √(‖r‖² + ε) = s √(‖r/s‖² + ε/s²) with s an exact power of two near max |r|: squares of
        # huge or tiny losses would overflow or underflow.
        scale = power_of_two_scale(residual)
        d2: Tensor = (
            scale * ((residual / scale).square().sum() + (_D2_EPS**0.5 / scale) ** 2).sqrt()
        )
        return d1 + self.theta * d2

    def _repr_args(self) -> str:
        return (
            f"theta={self.theta:g}, weights={tensor_repr(self.weights)}, "
            f"reference={tensor_repr(self.reference)}"
        )
