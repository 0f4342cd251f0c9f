"""DB-MTL's gradient-magnitude balancing: averaged task gradients, all rescaled to the largest norm."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import non_negative, unit_interval, validators
from jdoptim.aggregation._state_rows import check_state_shape
from jdoptim.linalg import power_of_two_scale


class DualBalancing(Stateful, Aggregator):
    r"""Aggregator of DB-MTL's gradient-magnitude balancing.

    Lin, Ye, Xu, Shi & Zhang, *Dual-Balancing for Multi-Task Learning* (2023), Section 3.2. At call
    ``k`` (from 1), with ``βₖ = β / k^{σ_β}``:

    * each task's gradient is averaged, ``Ĝ ← βₖ Ĝ + (1 − βₖ) J`` (``Ĝ₀ = 0``, one row per task),
    * every averaged row is rescaled to the largest norm among them and the rows are summed,
      ``d = Σᵢ (maxⱼ ‖ĝⱼ‖ / ‖ĝᵢ‖) ĝᵢ`` (a row of norm 0 adds nothing).

    So every task contributes a gradient of the same magnitude, the largest one, and no task's update
    is shrunk. The direction combines the averages ``Ĝ``, not ``J``, so there is no weighting form.

    The whole DB-MTL also balances the loss scales: ``J`` must be the Jacobian of the log-losses
    ``log(Lᵢ + ε)``. With the jdoptim optimizers, let the closure return ``(losses + 1e-8).log()``;
    :class:`jdoptim.scalarization.DBMTL` is the same transform summed into one scalar, for plain
    optimizers without this balancing. The name ``DualBalancing`` keeps the two apart in imports.

    Args:
        beta: averaging weight ``β ∈ [0, 1)`` of the previous average (0: no averaging).
        beta_sigma: decay exponent ``σ_β ≥ 0`` of ``βₖ``.

    The defaults ``β = 0.9``, ``σ_β = 0`` are those of the paper's experiments (LibMTL's defaults).

    State: ``Ĝ`` (``[m, n]``, as large as ``J``) and ``k``; :meth:`reset` clears them.
    """

    hyper_parameters = validators(
        beta=unit_interval("beta", high_open=True),
        beta_sigma=non_negative("beta_sigma"),
    )

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        if not (math.isfinite(beta_sigma) and beta_sigma >= 0):
            raise ValueError(f"beta_sigma must be a finite non-negative number, got {beta_sigma}.")
        self.beta = beta
        self.beta_sigma = beta_sigma

    def forward(self, matrix: Tensor, /) -> Tensor:
        jacobian = matrix.detach()
        average = self._state.get("average")
        if average is None:
            average = torch.zeros_like(jacobian)
            calls = 0
        else:
            check_state_shape(self, average, jacobian)
            average = average.to(jacobian)
            calls = int(self._state["calls"])
        calls += 1
        beta = self.beta / calls**self.beta_sigma
        average = beta * average + (1 - beta) * jacobian
        self._state.update(average=average, calls=calls)
        return balanced_sum(average)

    def _repr_args(self) -> str:
        return f"beta={self.beta}, beta_sigma={self.beta_sigma}"


def balanced_sum(rows: Tensor) -> Tensor:
    """``Σᵢ (maxⱼ ‖rowⱼ‖ / ‖rowᵢ‖) rowᵢ``, rows of norm 0 left out.

    Only ratios of norms matter, so they are taken after an exact power-of-two rescaling: squares
    of huge or tiny entries would overflow or underflow the rows' dtype.
    """
    scale = power_of_two_scale(rows)
    norms = torch.linalg.vector_norm(rows / scale, dim=1)
    scales = torch.where(norms > 0, norms.max() / norms, torch.zeros_like(norms))
    result: Tensor = scales @ rows
    return result
