"""DBMTL: the loss-scale balancing of dual-balancing multi-task learning (DB-MTL)."""

from __future__ import annotations

from torch import Tensor

from jdoptim.scalarization._bases import Scalarizer, check_number, numbers_table


class DBMTL(Scalarizer):
    """``Σᵢ log(Lᵢ + ε)``: every loss on a logarithmic scale.

    Lin et al., *Dual-Balancing for Multi-Task Learning* (2023), loss-scale balancing. The gradient
    of ``log Lᵢ`` is ``∇Lᵢ / Lᵢ``, so a loss's scale no longer decides its share of the update.

    This is only half of DB-MTL. Its other half, gradient-magnitude balancing (an exponential moving
    average of each task's gradient of ``log Lᵢ``, each rescaled to the largest of their norms
    before summing), needs one gradient per task, so it cannot be computed from loss values: it
    is the aggregator :class:`jdoptim.aggregation.DualBalancing`, applied by a jdoptim optimizer to
    the Jacobian of the log-losses (the closure returns ``(losses + eps).log()``). Used alone, this
    scalarizer is the ``log`` transform of the paper's ablation.

    Args:
        eps: added to each loss before the logarithm (the reference code uses ``1e-8``).
    """

    hyper_parameters = numbers_table(eps=False)

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = check_number(eps, "eps", positive=False)

    def forward(self, values: Tensor, /) -> Tensor:
        shifted = values + self.eps
        if bool((shifted <= 0).any()):
            raise ValueError(
                "DBMTL takes log(loss + eps): every loss must be greater than -eps, but the "
                f"smallest is {float(values.detach().min()):.3g}."
            )
        return shifted.log().sum()

    def _repr_args(self) -> str:
        return f"eps={self.eps:g}"
