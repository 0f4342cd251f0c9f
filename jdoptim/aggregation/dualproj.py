"""DualProj: the projection of the preferred direction onto the dual cone."""

from __future__ import annotations

from typing import get_args

from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, one_of, validators
from jdoptim.aggregation._pref import check_pref_vector, pref_weights
from jdoptim.aggregation._warm_start import WarmStarted
from jdoptim.linalg import DualConeSolver, project_to_dual_cone


class DualProjWeighting(WarmStarted, Weighting):
    """Weights of DualProj: ``w = argmin_{v ≥ p} vᵀ G v``.

    The combination ``pᵀJ`` (the mean gradient by default) is projected onto the dual cone of the
    rows, ``{x : J x ≥ 0}`` (Quinton & Rey, 2024, following Lopez-Paz & Ranzato's GEM, 2017).

    Args:
        pref_vector: preference ``p``; ``None`` means uniform ``1/m``.
        reg_eps: multiple of the identity added to the trace-normalised Gramian.
        solver: dual-cone solver: ``"quadprog"`` (one QP per row, CPU), ``"active_set"`` or
            ``"batched"`` (all rows at once in torch, on the Gramian's device) or ``"auto"`` (the
            fastest measured for the device and ``m``); see
            :func:`jdoptim.linalg.project_to_dual_cone`.

    State: the last call's projections ``v``, a warm start for the next call (same result to the
    solvers' tolerance; kept by ``state_dict()``, replaced when ``m`` changes, dropped by
    :meth:`reset`). It pays on per-task losses; on per-instance losses the optimizers reset it
    before each call, and a hand-written loop should too (docs/performance.md, "Warm start").
    """

    scale_invariant = True
    pref_vector: Tensor | None

    hyper_parameters = validators(
        pref_vector=check_pref_vector,
        reg_eps=non_negative("reg_eps"),
        solver=one_of("solver", get_args(DualConeSolver)),
    )

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        *,
        reg_eps: float = 1e-4,
        solver: DualConeSolver = "auto",
    ) -> None:
        super().__init__()
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.register_buffer("pref_vector", check_pref_vector(pref_vector), persistent=False)
        self.reg_eps = reg_eps
        self.solver: DualConeSolver = solver

    def forward(self, gramian: Tensor, /) -> Tensor:
        bounds = pref_weights(self.pref_vector, gramian).unsqueeze(0)
        solution = project_to_dual_cone(
            gramian,
            bounds,
            reg_eps=self.reg_eps,
            solver=self.solver,
            warm_start=self._warm_start(),
        )
        self._remember(solution)
        return solution[0]

    def _repr_args(self) -> str:
        return f"pref_vector={tensor_repr(self.pref_vector)}, reg_eps={self.reg_eps}, solver={self.solver!r}"


class DualProj(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`DualProjWeighting` (same arguments)."""

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        *,
        reg_eps: float = 1e-4,
        solver: DualConeSolver = "auto",
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, reg_eps=reg_eps, solver=solver))
