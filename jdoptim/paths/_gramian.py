"""The Gramian path: losses with a ``batch_dim`` → engine terms → Gramian → weights → ``.grad``.

The engine records each covered layer's inputs during the forward pass, and one backward pass of
output gradients turns them into per-parameter terms (``J_p`` in factored form). Terms of several
micro-batches (or ranks) concatenate along the instance dim into the terms of the whole batch, so
the Gramian ``Σ_p J_p J_pᵀ`` and the fused ``.grad = Σᵢ wᵢ gᵢ`` are exact for the concatenation.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import GeneralizedWeighting, Weighting
from jdoptim.autogram import (
    MaterializedTerm,
    Term,
    concat_terms,
    grad_from_terms,
    gramian_from_terms,
    scaled_gramian_from_terms,
)
from jdoptim.paths._base import Part, Path, StepContext, check_same_kind
from jdoptim.paths._method import Method
from jdoptim.paths._record import StepRecord
from jdoptim.paths._weights import (
    placeholder_gramian,
    wants_gramian,
    weights_for,
)


@dataclass
class TermsPart(Part):
    """One batch as the engine's per-parameter terms (rows instance-major)."""

    params: list[Tensor]
    terms: list[Term]
    graph_losses: Tensor | None  # the losses with their graph, for fuse_backward=False


@dataclass
class LossesPart(Part):
    """One batch whose weights need no Gramian: the losses with their graph."""

    graph_losses: Tensor


class GramianPath(Path):
    """Gramian weightings on instance-wise losses (``batch_dim`` given)."""

    def __init__(self, method: Method, context: StepContext) -> None:
        super().__init__(method, context)
        assert context.batch_dim is not None
        self.batch_dim: int = context.batch_dim
        self._watch = ExitStack()
        weakref.finalize(self, self._watch.close)
        self._backward_mode = False

    @property
    def weighting(self) -> Weighting | GeneralizedWeighting:
        module = self.module
        assert isinstance(module, Weighting | GeneralizedWeighting)
        return module

    def forward_context(self) -> AbstractContextManager[Any]:
        if self._backward_mode:
            self._watch_forward()  # on the current engine (it is rebuilt when params change)
            return nullcontext()
        self._watch.close()  # the watch of the first forward: the closure's capture takes over
        if not wants_gramian(self.weighting):
            return nullcontext()
        return self.context.engine().capture()

    def start_watching(self) -> None:
        """Backward-then-step: forward passes run outside any closure, and micro-batches may
        accumulate (so even shape-only weightings keep the engine's terms)."""
        self._backward_mode = True
        self._watch_forward()

    def watch_first_forward(self) -> None:
        """Without it, a first ``backward`` after a forward the engine did not see would take the
        exact per-row route (slow, and heavy on memory for large batches)."""
        self._watch_forward()

    def _watch_forward(self) -> None:
        """Keeps the engine's discovery hook on, for forward passes run outside any closure.

        Entered anew each time, on the current engine: once it has found (and hooked) every
        parameter's module, ``capture()`` installs no global hook any more. Engines built on
        ``modules=`` need none at all.
        """
        self._watch.close()
        self._watch.enter_context(self.context.engine().capture())

    def stop_watching(self) -> None:
        self._watch.close()

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim == 0:
            return self.grads_part(losses, losses, scale)
        scaled = losses * scale if scale != 1.0 else losses
        if not wants_gramian(self.weighting) and not self._backward_mode:
            return LossesPart(losses.detach(), scaled, scale=scale)
        engine = self.context.engine()
        pairs = engine.compute_terms(scaled)
        return TermsPart(
            losses.detach(),
            [param for param, _ in pairs],
            [term for _, term in pairs],
            scaled if not self.context.fuse_backward else None,
            scale=scale,
        )

    def combine(self, parts: Sequence[Part]) -> Part:
        check_same_kind(parts)
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if isinstance(first, TermsPart):
            given = [p for p in parts if isinstance(p, TermsPart)]
            params = _reached_by_any(given)
            terms_parts = [_aligned(p, params, given) for p in given]
            losses = _concat_losses([p.losses for p in terms_parts], self.batch_dim)
            terms = concat_terms(_same_forms(terms_parts))
            return TermsPart(losses, params, terms, None, scale=first.scale)
        if isinstance(first, LossesPart):
            graphs = [p.graph_losses for p in parts if isinstance(p, LossesPart)]
            graph = _concat_losses(graphs, self.batch_dim)
            values = _concat_losses([p.losses for p in parts], self.batch_dim)
            return LossesPart(values, graph, scale=first.scale)
        return self.combine_grads(parts)

    def apply(self, part: Part) -> StepRecord:
        if isinstance(part, TermsPart):
            gramian = self.gramian(part.terms, tuple(part.losses.shape), part.scale)
            weights = weights_for(self.weighting, gramian, instances=True)
            self.write_grad(part, weights)
            return StepRecord(part.losses, weights, _gramian=lambda: gramian)
        if isinstance(part, LossesPart):
            weights = weights_for(self.weighting, placeholder_gramian(part.losses))
            retain = self._backward_mode
            torch.autograd.backward(part.graph_losses, weights, retain_graph=retain)
            return StepRecord(part.losses, weights)
        return self.apply_grads(part)

    def gramian(self, terms: Sequence[Term], shape: tuple[int, ...], loss_scale: float) -> Tensor:
        """The Gramian of losses of ``shape`` from their ``terms``, as the weighting needs it.

        Scale-invariant weightings get the Gramian of ``J / s`` for an exact power of two ``s``
        (1 in normal ranges) that keeps tiny or huge Jacobians in float range; the others get
        the Gramian of the unscaled losses (divided by the ``GradScaler``'s scale squared).
        """
        dtype = torch.promote_types(terms[0].factors()[0][0].dtype, torch.float32)
        if _scale_invariant(self.weighting):
            gramian, _ = scaled_gramian_from_terms(terms, shape, self.batch_dim, dtype)
        else:
            gramian = gramian_from_terms(terms, shape, self.batch_dim, dtype)
            if loss_scale != 1.0:
                gramian = gramian / loss_scale**2
        return gramian

    def write_grad(self, part: TermsPart, weights: Tensor) -> None:
        """Adds ``Σᵢ wᵢ ∇ℓᵢ`` for the part's losses to ``.grad``."""
        if part.graph_losses is not None:
            torch.autograd.backward(part.graph_losses, weights.to(part.graph_losses.dtype))
        else:
            grad_from_terms(
                list(zip(part.params, part.terms, strict=True)), weights, self.batch_dim
            )


def _scale_invariant(weighting: Weighting | GeneralizedWeighting) -> bool:
    inner = getattr(weighting, "weighting", weighting)
    return bool(getattr(inner, "scale_invariant", False))


def _resized(shape: torch.Size, dim: int, rows: int, like_rows: int) -> list[int]:
    """``shape`` with its instance dim sized for ``rows`` losses instead of ``like_rows`` (the dim
    holds the instances, or instances times tasks: proportional either way)."""
    sizes = list(shape)
    sizes[dim] = sizes[dim] * rows // like_rows
    return sizes


def _reached_by_any(parts: Sequence[TermsPart]) -> list[Tensor]:
    """The parameters some micro-batch reached, in the order they first appear."""
    params: dict[int, Tensor] = {}
    for part in parts:
        for param in part.params:
            params.setdefault(id(param), param)
    return list(params.values())


def _aligned(part: TermsPart, params: list[Tensor], parts: Sequence[TermsPart]) -> TermsPart:
    """``part`` with a term for each of ``params``, in their order: a parameter its micro-batch
    did not reach (an expert no token was routed to, a branch not taken) has zero gradients for
    its losses, so a zero term, in the form another micro-batch's term for it takes (zero factors
    over this micro-batch's instances: no per-row gradients, no change of form)."""
    by_param = {id(param): term for param, term in zip(part.params, part.terms, strict=True)}
    rows = part.losses.numel()
    terms = []
    for param in params:
        term = by_param.get(id(param))
        if term is None:
            like, like_rows = next(
                (t, p.losses.numel())
                for p in parts
                for q, t in zip(p.params, p.terms, strict=True)
                if q is param
            )
            zeros = [
                factor.new_zeros(_resized(factor.shape, dim, rows, like_rows))
                for factor, dim in like.factors()
            ]
            term = like.with_factors(zeros)
        terms.append(term)
    return TermsPart(part.losses, params, terms, part.graph_losses, scale=part.scale)


def _same_forms(parts: Sequence[TermsPart]) -> list[list[Term]]:
    """Each part's terms, with a parameter's terms as per-row gradients wherever the parts hold
    different forms of it (the first ``backward`` before the engine watched a forward pass takes
    the exact route; a micro-batch of one instance may take another closed form)."""
    columns = list(zip(*(p.terms for p in parts), strict=True))
    for index, column in enumerate(columns):
        if len({type(term) for term in column}) > 1:
            rows = [term_rows(term) for term in column]
            # A sparse table's .grad stays sparse, whichever part knew the table was one.
            sparse = any(term.sparse for term in rows)
            columns[index] = tuple(replace(term, sparse=sparse) for term in rows)
    return [list(terms) for terms in zip(*columns, strict=True)]


def term_rows(term: Term) -> MaterializedTerm:
    """``term`` as per-row gradients: row ``r`` is its weighted gradient for the one-hot weights of
    row ``r`` (exact). The one form every term can take, so terms of differing forms combine."""
    if isinstance(term, MaterializedTerm):
        return term
    factor, dim = term.factors()[0]
    tasks = factor.shape[0] if dim == 1 else 1
    batch = factor.shape[dim]
    eye = torch.eye(batch * tasks, dtype=torch.float64, device=factor.device)
    rows = [term.weighted_grad(eye[r].reshape(batch, tasks)) for r in range(batch * tasks)]
    shape = tuple(rows[0].shape)
    # A sparse table's rows (nn.Embedding(sparse=True)) are stored dense; its .grad stays sparse.
    flat = [(r.to_dense() if r.is_sparse else r).reshape(-1) for r in rows]
    return MaterializedTerm(torch.stack(flat), shape, sparse=getattr(term, "sparse", False))


def _concat_losses(losses: Sequence[Tensor], batch_dim: int) -> Tensor:
    dim = batch_dim % losses[0].ndim
    others = {tuple(size for d, size in enumerate(loss.shape) if d != dim) for loss in losses}
    if len(others) > 1 or len({loss.ndim for loss in losses}) > 1:
        shapes = ", ".join(str(tuple(loss.shape)) for loss in losses)
        raise ValueError(
            f"The micro-batches of one step gave losses of shapes {shapes}: they must match "
            f"except along batch_dim={batch_dim}, since each loss is an objective of the step "
            "(per-token losses need the same length in every micro-batch). Pad the sequences "
            "to one length, or reduce the losses over positions first (one loss per instance)."
        )
    return torch.cat(list(losses), dim=dim)
