"""Batched dual-cone projection: every row of ``U`` at once, in torch, on the Gramian's device.

For each row ``u`` of ``U`` we want ``v = argmin vᵀGv`` subject to ``v ≥ u`` (problem (1) of
:mod:`jdoptim.linalg._dual_cone`, with ``G`` positive definite). Writing ``v = u + s``, its KKT
conditions are the linear complementarity problem

    μ = G s + G u,    s ≥ 0,    μ ≥ 0,    sᵀμ = 0,                              (LCP)

where ``μ = G v`` is the multiplier of ``v ≥ u``. Guessing the free set ``F = {j : s_j > 0}`` turns
(LCP) into the linear system ``G_FF s_F = -(G u)_F`` (and ``s_j = 0`` off ``F``); the guess is right
when the solution has ``s_F ≥ 0`` and ``μ ≥ 0`` off ``F``. Block principal pivoting (Júdice & Pires,
*A block principal pivoting algorithm for large-scale strictly monotone LCPs*, 1994; Kim & Park,
*Fast nonnegative matrix factorization*, 2011) swaps every variable with a wrong sign and solves
again; when a row's number of wrong signs stops falling it swaps one variable at a time (Murty's
rule: the largest wrong index), which terminates for positive-definite ``G``.

The systems of all rows share ``G``, so they are solved together, each round continuing from the
previous round's slacks. A system is solved directly on the smaller of its two sides when that is
small in every row: ``G_FF`` itself (few free variables), or through the inverse ``H = G⁻¹``, since
``(G_FF)⁻¹ = H_FF − H_FA (H_AA)⁻¹ H_AF`` needs only a system in ``H_AA`` (few active bounds, the
common case for the Gramians of real models, and one whose conditioning does not degrade with the
rank of ``G``). Both are compacted to the largest such side (at most ``max(48, 1.7 m^(2/3))``,
where a round of them costs less than the conjugate-gradient rounds they replace). Otherwise
conjugate gradient runs with one matrix product ``S G`` per iteration for the whole batch, in
float32 on corrections to the float64 residual (mixed-precision iterative refinement). The
problem is first rescaled to a unit diagonal (``G → DGD``, ``u → D⁻¹u``, ``D = diag(G)^-½``,
which changes no solution) and each row of ``U`` to unit size (``v(c u) = c v(u)`` for
``c > 0``). A row is accepted only when its KKT residuals are below tolerance, so the result is
exact to that tolerance or a ``RuntimeError`` says so; it never returns an unconverged row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.linalg._dual_cone_unit import unit_problem

# Wrong signs must be clear (beyond round-off of the inner solves) before a variable is swapped.
_SIGN_TOLERANCE = 1e-9
# Stationarity residual max_j∈F |μ_j| accepted for a row, relative to the unit-scaled problem.
_RESIDUAL_TOLERANCE = 1e-10
# Full exchanges allowed without progress before a row falls back to single exchanges.
_BACKUP_EXCHANGES = 3
# Inner systems are factorised when the smaller of their two sides (free variables, or active
# bounds through the inverse) has at most max(48, 1.7 m^(2/3)) unknowns in every row: a batched
# Cholesky of that size costs less than the rounds of conjugate gradient it replaces
# (benchmarks/bench_dual_cone.py; _direct_max_unknowns). The blocks of all rows together hold at
# most _DIRECT_MAX_ELEMENTS entries (128 MiB in float64).
_DIRECT_MAX_UNKNOWNS = 48
_DIRECT_GROWTH = 1.7
_DIRECT_MAX_ELEMENTS = 2**24
# Up to this m, every row's system padded to m x m (no gathering, no host read) costs less.
_PADDED_MAX_SIZE = 32
# Conjugate gradient is preconditioned by H_FF (H = G⁻¹) after a round that took more iterations
# than this (an ill-conditioned G): it then cuts the iterations by more than the second product per
# iteration costs. Well-conditioned Gramians (random ones take 10 to 11 per round) never pay for H.
_PRECONDITION_AFTER = 16
# Residual reduction of one inner solve (one refinement step).
_INNER_REDUCTION = 1e-3
# Conjugate-gradient iterations between two reads of the rows' progress on the host: every
# iteration on the CPU, where a read is cheap and extra iterations are not; every few elsewhere,
# where each read waits for the device.
_CPU_CHECK_EVERY = 1
_ACCELERATOR_CHECK_EVERY = 4


class DualConeConvergenceError(RuntimeError):
    """Some rows did not meet the KKT tolerance within the round bound.

    ``partial`` holds the solutions (the converged rows are exact; the others hold their bounds) and
    ``rows`` the indices of the unconverged rows, so a caller can finish just those another way.
    """

    def __init__(self, message: str, partial: Tensor, rows: Tensor) -> None:
        super().__init__(message)
        self.partial = partial
        self.rows = rows


def solve_dual_cone_batched(
    matrix: Tensor,
    lower_bounds: Tensor,
    *,
    max_rounds: int | None = None,
    max_cg_iterations: int | None = None,
    warm_start: Tensor | None = None,
) -> Tensor:
    """Returns the ``[k, m]`` solutions of ``min vᵀ G v`` s.t. ``v ≥ u`` for the rows ``u`` of ``U``.

    Args:
        matrix: ``[m, m]`` symmetric positive-definite matrix ``G`` (the prepared Gramian, see
            :func:`jdoptim.linalg.prepare_dual_cone_gramian`).
        lower_bounds: ``[k, m]`` matrix ``U``.
        max_rounds: bound on the rounds (pivoting or refinement; default ``m + 30``).
        max_cg_iterations: bound on conjugate-gradient iterations per round (default
            ``2 m + 100``).
        warm_start: optional ``[k, m]`` guess of the solutions (such as the previous step's): the
            pivoting starts from its free sets ``{j : v_j > u_j}`` and slacks instead of
            ``{j : (G u)_j < 0}`` and zero, which leaves less for the inner solves to do.

    Returns:
        The solutions, on ``matrix``'s device and with its dtype. They are computed in float64.

    Raises:
        DualConeConvergenceError: a ``RuntimeError``, if some row does not meet the KKT tolerance
            within ``max_rounds`` rounds (possible on very ill-conditioned problems, e.g. with a
            ``reg_eps`` far below the default).
    """
    size = matrix.shape[0]
    rounds_bound = size + 30 if max_rounds is None else max_rounds
    cg_bound = 2 * size + 100 if max_cg_iterations is None else max_cg_iterations
    problem = unit_problem(matrix, lower_bounds)
    bounds = lower_bounds.to(torch.float64)
    initial_slack = None
    if warm_start is not None:
        guess = (warm_start.to(bounds) - bounds).clamp(min=0.0)
        initial_slack = guess / (problem.row_scale * problem.column_scale)
    slack, unconverged = _solve_lcp(
        problem.gramian, problem.bounds, rounds_bound, cg_bound, initial_slack
    )
    # v = u + D s r, so bounds that are active hold exactly and slacks are never negative.
    solution = problem.solution(bounds, slack, matrix.dtype)
    if unconverged.numel() > 0:
        raise DualConeConvergenceError(
            f"The batched dual-cone solver did not converge in {rounds_bound} rounds for "
            f"{unconverged.numel()} of {bounds.shape[0]} rows. The Gramian is probably too "
            "ill-conditioned: raise reg_eps, or use solver='quadprog'.",
            solution,
            unconverged,
        )
    return solution


def _solve_lcp(
    gramian: Tensor, bounds: Tensor, max_rounds: int, max_cg: int, initial_slack: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Slack ``s`` of (LCP) for every row of ``bounds``, on a unit-diagonal float64 ``gramian``.

    Also returns the indices of the rows that did not converge (their slack is zero).

    Each round solves the current systems approximately in float32 (twice the matrix-product speed)
    as a correction to the float64 residual, i.e. mixed-precision iterative refinement: loose
    solves while the signs settle, and the float64 residual drives the final accuracy. If float32
    is too coarse for the matrix (refinement stalls), the inner solves switch to float64.
    """
    linear = bounds @ gramian  # row r: G u_r (G is symmetric)
    slack = torch.zeros_like(bounds)
    pending = (linear < -_SIGN_TOLERANCE).any(dim=1).nonzero().flatten()
    if pending.numel() == 0:
        return slack, pending

    inner = _InnerSolver(gramian, max_cg)
    q = linear[pending]
    if initial_slack is None:
        free = q < 0
        s = torch.zeros_like(q)
        multiplier = q
    else:
        s = initial_slack[pending]
        free = s > 0
        multiplier = q + s @ gramian
    best = free.sum(dim=1)
    backups = torch.full_like(best, _BACKUP_EXCHANGES)
    ranks = torch.arange(1, q.shape[1] + 1, device=q.device)  # Murty's rule: the largest wins
    residual_tolerance = _RESIDUAL_TOLERANCE * q.abs().amax(dim=1).clamp(min=1.0)

    for round_index in range(max_rounds):
        mask = free.to(q.dtype)
        before = -multiplier * mask
        correction = inner.solve(before, free)
        s = s + correction.to(s.dtype) * mask
        multiplier = q + s @ gramian
        stationarity = (multiplier * mask).abs().amax(dim=1)
        if inner.in_float32 and inner.iterative:  # the direct routes are exact in float64
            start = before.abs().amax(dim=1)
            stalled = (stationarity > 0.1 * start) & (start > residual_tolerance)
            if bool(stalled.any()):
                inner.use_float64()
        # A slack of F or a multiplier off F below zero.
        wrong = torch.where(free, s, multiplier) < -_SIGN_TOLERANCE
        wrong_count = wrong.sum(dim=1)
        accurate = stationarity <= residual_tolerance
        done = (wrong_count == 0) & accurate
        finished_count = int(done.sum())
        if finished_count > 0:
            keep, finished = _split_rows(~done, done.numel() - finished_count)
            slack[pending[finished]] = s[finished].clamp(min=0)
            pending, q, s, free, wrong = pending[keep], q[keep], s[keep], free[keep], wrong[keep]
            multiplier = multiplier[keep]
            best, backups, wrong_count = best[keep], backups[keep], wrong_count[keep]
            accurate, residual_tolerance = accurate[keep], residual_tolerance[keep]
            if pending.numel() == 0:
                return slack, pending
        progress = wrong_count < best
        best = torch.minimum(best, wrong_count)
        backups = torch.where(progress, _BACKUP_EXCHANGES, backups - (wrong_count > 0).long())
        swap = wrong
        # A row swaps singly only once it has gone _BACKUP_EXCHANGES + 1 rounds without progress.
        if round_index >= _BACKUP_EXCHANGES:
            # Single exchanges (Murty's rule) need exact signs: until the solve is accurate, refine.
            full_exchange = (backups >= 0)[:, None]
            largest_wrong = (wrong * ranks).argmax(dim=1, keepdim=True)
            single = torch.zeros_like(wrong).scatter_(1, largest_wrong, True) & wrong
            swap = torch.where(full_exchange, wrong, single & accurate[:, None])
        free = free ^ swap
        # Slacks of F stay as solved (clamping them would undo the refinement of a row that waits
        # for a single exchange); those leaving F drop to zero.
        updated = torch.where(free, s, 0.0)
        # Few slacks change in a swap: update μ = q + s G through them instead of a new product.
        removed = (s - updated).to_sparse()
        multiplier = multiplier - torch.sparse.mm(removed, gramian)
        s = updated
    return slack, pending


class _InnerSolver:
    """Solves each round's systems ``G_FF x_F = rhs_F`` by the cheapest route (module docstring).

    Keeps what the rounds of one call share: the float32 copy of ``G`` for conjugate gradient
    (float64 once refinement stalls), ``H = G⁻¹`` (computed on first need, ``None`` if ``G`` is
    not positive definite), the direct routes' :class:`_Blocks` of ``G`` and ``H`` (built on
    first need), and whether conjugate gradient is preconditioned by ``H_FF``: from the first
    round whose conjugate gradient took more than ``_PRECONDITION_AFTER`` iterations (an
    ill-conditioned ``G``; a well-conditioned one never pays for ``H``).
    """

    def __init__(self, gramian: Tensor, max_cg: int) -> None:
        self._gramian = gramian
        self._inner = gramian.to(torch.float32)
        self._max_cg = max_cg
        self._direct_max = _direct_max_unknowns(gramian.shape[0])
        self._inverse: Tensor | None = None
        self._inverted = False
        self._blocks: dict[str, _Blocks] = {}
        self._preconditioner: Tensor | None = None
        #: Whether the last round's systems were solved by conjugate gradient (approximately).
        self.iterative = False

    def use_float64(self) -> None:
        """Conjugate gradient in float64 from now on (float32 is too coarse for ``G``)."""
        self._inner = self._gramian
        if self._preconditioner is not None:
            self._preconditioner = self._inverse

    @property
    def in_float32(self) -> bool:
        return self._inner.dtype != self._gramian.dtype

    def inverse(self) -> Tensor | None:
        if not self._inverted:
            factor, info = torch.linalg.cholesky_ex(self._gramian)
            self._inverse = torch.cholesky_inverse(factor) if int(info) == 0 else None
            self._inverted = True
        return self._inverse

    def blocks(self, name: str, matrix: Tensor) -> _Blocks:
        """The :class:`_Blocks` of ``matrix`` (``"gramian"`` or ``"inverse"``), built once."""
        if name not in self._blocks:
            self._blocks[name] = _Blocks(matrix, self._direct_max)
        return self._blocks[name]

    def solve(self, rhs: Tensor, free: Tensor) -> Tensor:
        """``x`` with ``G_FF x_F = rhs_F`` and ``x = 0`` off ``F``, for every row: exact (to
        round-off) when every row has few free variables or few active bounds, otherwise
        approximate (conjugate gradient, reducing the residual by ``_INNER_REDUCTION``)."""
        self.iterative = False
        if free.shape[1] <= _PADDED_MAX_SIZE:
            return _padded_cholesky_solve(self._gramian, rhs, free)
        free_count = free.sum(dim=1)
        # Both sizes in one host read (an .item(), which benchmarks/count_ops.py counts).
        width = free.shape[1] + 1
        packed = free_count.amax() * width + (free.shape[1] - free_count.amin())
        largest_free, largest_fixed = divmod(int(packed.item()), width)
        if largest_fixed < min(largest_free, self._direct_max + 1):
            inverse = self.inverse()
            if inverse is not None:
                blocks = self.blocks("inverse", inverse)
                return _solve_through_inverse(inverse, blocks, rhs, free, largest_fixed)
        if largest_free <= self._direct_max:
            blocks = self.blocks("gramian", self._gramian)
            return _compact_cholesky_solve(blocks, rhs, free, largest_free)
        # Conjugate gradient on H_AA instead would have to reduce its residual relative to rhs,
        # not to (H rhs)_A, far larger when G is ill-conditioned: measured slower at every m.
        self.iterative = True
        solution, iterations = _masked_conjugate_gradient(
            self._inner, rhs, free, self._max_cg, self._preconditioner
        )
        if self._preconditioner is None and iterations > _PRECONDITION_AFTER:
            inverse = self.inverse()
            if inverse is not None:
                self._preconditioner = inverse.to(self._inner.dtype)
        return solution


def _direct_max_unknowns(size: int) -> int:
    """The most unknowns a direct route takes for an ``m = size`` problem (module docstring).

    A direct round costs about ``m·k³/3`` flops in small batched factorisations, a round of
    conjugate gradient a dozen ``m x m`` products (``~24 m³``, at several times the speed), and a
    direct round is exact where conjugate gradient needs refinement rounds: the direct route pays
    up to ``k ≈ 1.7 m^(2/3)`` (48 at m = 128, 108 at m = 512), within ``_DIRECT_MAX_ELEMENTS``.
    """
    grown = max(_DIRECT_MAX_UNKNOWNS, int(_DIRECT_GROWTH * size ** (2 / 3)))
    return min(grown, math.isqrt(_DIRECT_MAX_ELEMENTS // max(size, 1)))


def _solve_through_inverse(
    inverse: Tensor, blocks: _Blocks, rhs: Tensor, free: Tensor, largest_fixed: int
) -> Tensor:
    """``x_F = (G_FF)⁻¹ rhs_F`` from ``H = G⁻¹`` and one system in ``H_AA`` (``A`` = not ``F``;
    ``blocks`` are ``H``'s).

    ``x = H (r + λ)`` with ``λ`` on ``A`` chosen so that ``x_A = 0``: ``H_AA λ_A = −(H r)_A``.
    """
    mask = free.to(inverse.dtype)
    through = torch.mm(rhs * mask, inverse)  # H is symmetric
    multiplier = _compact_cholesky_solve(blocks, -through, ~free, largest_fixed)
    return (through + torch.mm(multiplier, inverse)) * mask


def _padded_cholesky_solve(gramian: Tensor, rhs: Tensor, free: Tensor) -> Tensor:
    """Solves ``G_FF x_F = rhs_F`` (``x = 0`` off ``F``) for every row, each padded to ``m x m``.

    The identity pads each row's system off ``F``; one batched Cholesky. A row whose ``G_FF`` is
    singular (possible only without regularisation) gets no correction, so it stalls visibly.
    """
    mask = free.to(gramian.dtype)
    systems = gramian * mask[:, :, None] * mask[:, None, :] + torch.diag_embed(1 - mask)
    return _cholesky_solve_each(systems, rhs * mask) * mask


class _Blocks:
    """``M`` with an identity block appended, ``[[M, 0], [0, I]]`` (``I`` of the direct routes'
    largest size), built once per call: each row's principal block of ``M`` over its chosen
    indices is then one gather, already padded with the identity (the padding slots point into
    ``I``, one each), with no masking pass over ``[rows, k, k]``."""

    def __init__(self, matrix: Tensor, most: int) -> None:
        self.size, self.width = matrix.shape[0], matrix.shape[0] + most
        augmented = matrix.new_zeros(self.width, self.width)
        augmented[: self.size, : self.size] = matrix
        augmented.diagonal()[self.size :] = 1.0
        self.flat = augmented.reshape(-1)
        # Flat positions in int32 where they fit, then index_select: 3x faster than take here.
        self.positions = torch.int32 if self.width**2 < 2**31 else torch.int64

    def gather(self, order: Tensor, valid: Tensor) -> Tensor:
        """``[rows, k, k]``: the blocks over ``order`` (``[rows, k]``), identity where not
        ``valid``."""
        size = order.shape[1]
        slots = torch.arange(self.size, self.size + size, device=order.device)
        index = torch.where(valid, order, slots).to(self.positions)
        flat = (index.unsqueeze(2) * self.width + index.unsqueeze(1)).reshape(-1)
        return self.flat.index_select(0, flat).reshape(*order.shape, size)


def _compact_cholesky_solve(blocks: _Blocks, rhs: Tensor, chosen: Tensor, size: int) -> Tensor:
    """Solves ``M_CC x_C = rhs_C`` (``x = 0`` off ``C``) for every row, ``|C| ≤ size``.

    Each row's system is gathered from ``blocks`` (of ``M``) into a ``size x size`` block
    (padded with the identity) and factorised in one batched Cholesky. A row whose block is not
    positive definite (possible only without regularisation) gets no correction, so it stalls
    visibly.
    """
    if size == 0:
        return torch.zeros_like(rhs)
    # ``size`` distinct indices per row, the chosen ones among them (in no particular order; topk
    # costs a third of a stable argsort here); the others pad the block.
    order = torch.topk(chosen.to(torch.uint8), size, dim=1, sorted=False).indices
    valid = torch.gather(chosen, 1, order)
    mask = valid.to(rhs.dtype)
    block = blocks.gather(order, valid)
    compact = _cholesky_solve_each(block, torch.gather(rhs, 1, order) * mask)
    return torch.zeros_like(rhs).scatter_(1, order, compact * mask)


def _cholesky_solve_each(systems: Tensor, rhs: Tensor) -> Tensor:
    """``x`` with ``systems[r] x[r] = rhs[r]`` for every row ``r`` (``[r, k, k]``, ``[r, k]``), by
    batched Cholesky; zero for a row whose system is not positive definite (possible only
    without regularisation), so that row stalls visibly.

    The upper factor and two triangular solves: measured 15% faster on the CPU than the lower
    factor and ``cholesky_solve``, for the same solutions to round-off.
    """
    factor, info = torch.linalg.cholesky_ex(systems, upper=True)
    forward = torch.linalg.solve_triangular(factor.mT, rhs.unsqueeze(2), upper=False)
    solution = torch.linalg.solve_triangular(factor, forward, upper=True).squeeze(2)
    return torch.where((info == 0).unsqueeze(1), solution, 0.0)


def _split_rows(keep: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """The indices of the rows where ``keep`` holds (``kept`` of them, a count the host already
    read) and of the others, each in order. Indexing by these costs no host synchronisation,
    where indexing by the boolean mask itself would (its size must reach the host)."""
    order = torch.argsort((~keep).to(torch.int8), stable=True)
    return order[:kept], order[kept:]


def _masked_conjugate_gradient(
    gramian: Tensor,
    rhs: Tensor,
    free: Tensor,
    max_iterations: int,
    preconditioner: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Approximately solves ``G_FF x_F = rhs_F`` (``x = 0`` off ``F``) for every row, from zero.

    A row is done once its residual has fallen by ``_INNER_REDUCTION``. With a ``preconditioner``
    ``P`` (``H = G⁻¹``), each iteration also applies ``P_FF`` (a second product). Progress is read
    on the host every iteration on the CPU, every ``_ACCELERATOR_CHECK_EVERY`` elsewhere. Rows that
    are done are dropped from the batch in bulk, so the products shrink with them. Also returns
    the number of iterations run.
    """
    mask = free.to(gramian.dtype)
    r = rhs.to(gramian.dtype) * mask
    rr = (r * r).sum(dim=1, keepdim=True)
    threshold = rr * _INNER_REDUCTION**2
    z = r if preconditioner is None else torch.mm(r, preconditioner).mul_(mask)
    rz = rr if preconditioner is None else (r * z).sum(dim=1, keepdim=True)
    x = torch.zeros_like(r)
    p = z.clone()
    zeros = torch.zeros_like(rr)
    infinite = torch.full_like(rr, torch.inf)
    active = torch.arange(r.shape[0], device=r.device)
    result = torch.zeros_like(r)
    check_every = _CPU_CHECK_EVERY if r.device.type == "cpu" else _ACCELERATOR_CHECK_EVERY
    iteration = 0
    for iteration in range(max_iterations):
        if iteration % check_every == 0:
            unconverged = (rr > threshold).squeeze(1)
            remaining = int(unconverged.sum())
            if remaining == 0:
                break
            # Dropping rows costs copies; drop them in bulk, and let the few in between iterate on.
            if 4 * (unconverged.numel() - remaining) >= unconverged.numel():
                keep, converged = _split_rows(unconverged, remaining)
                result[active[converged]] = x[converged]
                active, x, r, p = active[keep], x[keep], r[keep], p[keep]
                rr, rz, mask = rr[keep], rz[keep], mask[keep]
                threshold = threshold[keep]
                zeros, infinite = zeros[keep], infinite[keep]
        product = torch.mm(p, gramian).mul_(mask)
        curvature = (p * product).sum(dim=1, keepdim=True)
        # A singular G_FF (only without regularisation) stalls the row instead of making NaNs.
        positive = curvature > 0
        step = torch.where(positive, rz / curvature, zeros)
        threshold = torch.where(positive, threshold, infinite)
        x.addcmul_(step, p)
        r.addcmul_(step, product, value=-1)
        rr = (r * r).sum(dim=1, keepdim=True)
        if preconditioner is None:
            z, rz_next = r, rr
        else:
            z = torch.mm(r, preconditioner).mul_(mask)
            rz_next = (r * z).sum(dim=1, keepdim=True)
        p = torch.addcmul(z, torch.where(rz > 0, rz_next / rz, zeros), p)
        rz = rz_next
    result[active] = x
    return result, iteration
