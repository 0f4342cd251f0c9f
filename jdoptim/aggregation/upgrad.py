"""UPGrad: the unconflicting projection of gradients."""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import non_negative, one_of, validators
from jdoptim.aggregation._pref import check_pref_vector, pref_weights
from jdoptim.aggregation._warm_start import WarmStarted
from jdoptim.linalg import DualConeSolver, project_to_dual_cone


class UPGradWeighting(WarmStarted, Weighting):
    r"""Weights of UPGrad (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024).

    Each row ``gᵢ`` of ``J``, scaled by its preference ``pᵢ``, is projected onto the dual cone of the
    rows, ``{x : J x ≥ 0}``, and the projections are summed. In weight space, row ``i`` contributes
    ``vᵢ = argmin_{v ≥ pᵢ eᵢ} vᵀ G v`` and ``w = Σᵢ vᵢ``. The result never conflicts with any row
    (``J wᵀJ ≥ 0``) and equals ``pᵀ J`` when no rows conflict.

    Args:
        pref_vector: preference ``p`` over the objectives; ``None`` means uniform ``1/m``.
        reg_eps: multiple of the identity added to the trace-normalised Gramian (the Gramian is
            normalised by its trace at any scale, so the weights do not depend on the losses'
            scale; a zero Gramian gives ``w = p``).
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
        pref = pref_weights(self.pref_vector, gramian)
        bounds = torch.diag(pref)
        solutions = project_to_dual_cone(
            gramian,
            bounds,
            reg_eps=self.reg_eps,
            solver=self.solver,
            warm_start=self._warm_start(),
        )
        self._remember(solutions)
        return solutions.sum(dim=0)

    def _repr_args(self) -> str:
        return f"pref_vector={tensor_repr(self.pref_vector)}, reg_eps={self.reg_eps}, solver={self.solver!r}"


class UPGrad(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`UPGradWeighting` (same arguments)."""

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        *,
        reg_eps: float = 1e-4,
        solver: DualConeSolver = "auto",
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, reg_eps=reg_eps, solver=solver))
