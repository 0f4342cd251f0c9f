"""Nash-MTL: the Nash bargaining solution between the objectives."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim._warnings import warn
from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import integer_at_least, non_negative, optional, validators
from jdoptim.linalg import solve_alpha_fair

# Backward error above which the weights are reported as inaccurate.
_RESIDUAL_WARNING = 1e-6


class NashMTLWeighting(Stateful, Weighting):
    r"""Weights of Nash-MTL (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    Algorithm 1).

    The Nash bargaining solution ``d = Jᵀα`` maximises ``Σᵢ log(gᵢᵀd)`` in a ball; it is given by
    ``G α = 1/α`` elementwise with ``α > 0`` (Section 3 of the paper), on the Gramian itself: the
    weights scale as ``1/s`` for ``J → sJ``, and ``‖Jᵀα‖² = αᵀGα = m`` at any scale. For the
    numerics it is solved on ``Ĝ = G / ‖G‖_F`` (as the authors' code does, which also undoes the
    normalisation: ``α = α̂ / ‖G‖_F^½``). The paper approaches the solution with a sequence of
    convex problems (CCP) of a few iterations; here the same equation is solved exactly, by
    Newton's method on the strictly convex potential ``½ α̂ᵀĜα̂ - Σᵢ log α̂ᵢ`` whose gradient it is
    (:func:`jdoptim.linalg.solve_alpha_fair`), warm-started at the previous solution, to a
    componentwise backward error of ``1e-10`` (``RuntimeWarning`` above ``1e-6``). Then, if
    ``‖Jᵀα‖ > max_norm``, the weights are scaled down to ``‖Jᵀα‖ = max_norm`` (the authors'
    gradient clipping: with the default ``1``, a step of length 1 for ``m ≥ 2``).

    Stateful: it keeps the last solution (reused for ``update_weights_every - 1`` calls; its
    normalised form is the warm start) and counts its calls; ``state_dict()``/``load_state_dict()`` and ``reset()`` cover
    both.

    Args:
        n_tasks: number of objectives, checked at each call when given (``None``: any).
        max_norm: bound on ``‖Jᵀα‖``; ``0`` disables the clipping.
        update_weights_every: solve at one call in that many and reuse the solution in between.
        max_iters: Newton iterations at most per solve.
        reg_eps: multiple of the identity added to ``Ĝ``, so that a solution exists when some
            gradient is zero.
    """

    hyper_parameters = validators(
        n_tasks=optional(integer_at_least("n_tasks", 1)),
        max_norm=non_negative("max_norm"),
        update_weights_every=integer_at_least("update_weights_every", 1),
        max_iters=integer_at_least("max_iters", 1),
        reg_eps=non_negative("reg_eps"),
    )

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        max_iters: int = 100,
        *,
        reg_eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if n_tasks is not None and n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive integer or None, got {n_tasks}.")
        if not (math.isfinite(max_norm) and max_norm >= 0):
            raise ValueError(f"max_norm must be a finite non-negative number, got {max_norm}.")
        if update_weights_every < 1:
            raise ValueError(
                f"update_weights_every must be a positive integer, got {update_weights_every}."
            )
        if max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters}.")
        if reg_eps < 0:
            raise ValueError(f"reg_eps must be non-negative, got {reg_eps}.")
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.max_iters = max_iters
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        size = gramian.shape[0]
        if self.n_tasks is not None and size != self.n_tasks:
            raise ValueError(
                f"NashMTLWeighting was built for n_tasks={self.n_tasks} objectives but got "
                f"{size}; pass the right n_tasks (or None)."
            )
        calls: int = self._state.get("calls", 0)
        previous: Tensor | None = self._state.get("weights")
        matrix = gramian.to(torch.float64)
        if previous is None or previous.shape != (size,) or calls % self.update_weights_every == 0:
            warm: Tensor | None = self._state.get("normalised")
            fitting = warm is not None and warm.shape == (size,)
            solution, normalised = self._solve(matrix, warm if fitting else None)
            self._state["weights"] = solution
            self._state["normalised"] = normalised
        else:
            solution = previous.to(matrix.device)
        self._state["calls"] = calls + 1
        weights = solution
        if self.max_norm > 0:
            norm = math.sqrt(max(float(solution @ matrix @ solution), 0.0))
            if norm > self.max_norm:
                weights = solution * (self.max_norm / norm)
        return weights.to(gramian.dtype)

    def _solve(self, matrix: Tensor, warm: Tensor | None) -> tuple[Tensor, Tensor]:
        """The weights of ``matrix`` and those of its normalised form (the next warm start: they
        do not depend on the Gramian's scale, which may change by orders of magnitude)."""
        size = matrix.shape[0]
        scale = float(torch.linalg.matrix_norm(matrix))
        if not scale > 0:
            # Every gradient is zero: no bargaining solution, and any weights give a zero update.
            ones = torch.ones(size, dtype=torch.float64, device=matrix.device)
            return ones, ones
        initial = None if warm is None else warm.to(matrix.device)
        normalised, residual = solve_alpha_fair(
            matrix / scale, 1.0, ridge=self.reg_eps, initial=initial, max_iters=self.max_iters
        )
        solution = normalised / math.sqrt(scale)
        if residual > _RESIDUAL_WARNING:
            warn(
                f"Nash-MTL's system G α = 1/α was solved only to a backward error of "
                f"{residual:.2e} in {self.max_iters} iterations; raise max_iters.",
                RuntimeWarning,
            )
        return solution, normalised

    def _repr_args(self) -> str:
        return (
            f"n_tasks={self.n_tasks}, max_norm={self.max_norm}, "
            f"update_weights_every={self.update_weights_every}, max_iters={self.max_iters}, "
            f"reg_eps={self.reg_eps}"
        )


class NashMTL(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`NashMTLWeighting` (same arguments; state included)."""

    def __init__(
        self,
        n_tasks: int | None = None,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        max_iters: int = 100,
        *,
        reg_eps: float = 1e-10,
    ) -> None:
        super().__init__(
            NashMTLWeighting(n_tasks, max_norm, update_weights_every, max_iters, reg_eps=reg_eps)
        )

    def reset(self) -> None:
        """Forgets the weighting's previous solution and call count."""
        weighting = self.weighting
        assert isinstance(weighting, NashMTLWeighting)
        weighting.reset()
