"""GeometricMean: the geometric loss strategy (GLS)."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._bases import Scalarizer


class GeometricMean(Scalarizer):
    """``(Πᵢ Lᵢ)^(1/m)``, computed as ``exp(mean(log L))``; the losses must be positive.

    Chennupati et al., *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
    Multi-Task Learning* (CVPR Workshops 2019). Its gradient weighs each loss by ``GM / (m Lᵢ)``,
    so tasks whose loss is small relative to the others are not drowned out.
    """

    def forward(self, values: Tensor, /) -> Tensor:
        if bool((values <= 0).any()):
            raise ValueError(
                "GeometricMean needs strictly positive losses (it takes their logarithm); got a "
                f"minimum of {float(values.detach().min()):.3g}. Shift the losses or use another scalarizer."
            )
        return values.log().mean().exp()
