"""The Gramian path: losses with a ``batch_dim`` → engine terms → Gramian → weights → ``.grad``.

The engine records each covered layer's inputs during the forward pass, and one backward pass of
output gradients turns them into per-parameter terms (``J_p`` in factored form). Terms of several
micro-batches (or ranks) concatenate along the instance dim into the terms of the whole batch, so
the Gramian ``Σ_p J_p J_pᵀ`` and the fused ``.grad = Σᵢ wᵢ gᵢ`` are exact for the concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation import GeneralizedWeighting, Weighting
from jdoptim.autogram import Engine
from jdoptim.autogram._rules import Term
from jdoptim.paths._base import Part, Path, StepContext, check_same_kind
from jdoptim.paths._method import Method
from jdoptim.paths._record import StepRecord
from jdoptim.paths._terms import concat_terms, grad_from_terms, gramian_from_terms
from jdoptim.paths._weights import (
    check_gramian_finite,
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
        self._watched: Engine | None = None

    @property
    def weighting(self) -> Weighting | GeneralizedWeighting:
        module = self.module
        assert isinstance(module, Weighting | GeneralizedWeighting)
        return module

    def forward_context(self) -> AbstractContextManager[Any]:
        if not wants_gramian(self.weighting):
            return nullcontext()
        return self.context.engine().capture()

    def start_watching(self) -> None:
        """Keeps the engine's discovery hook on (the user runs the forward outside any closure)."""
        engine = self.context.engine()
        if self._watched is not engine:
            self._watch.close()
            self._watch.enter_context(engine.capture())
            self._watched = engine

    def stop_watching(self) -> None:
        self._watch.close()
        self._watched = None

    def differentiate(self, losses: Tensor, features: Any = None, scale: float = 1.0) -> Part:
        if losses.ndim == 0:
            return self.grads_part(losses, losses, scale)
        scaled = losses * scale if scale != 1.0 else losses
        if not wants_gramian(self.weighting) and self._watched is None:
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
            terms_parts = [_aligned(p, first) for p in parts if isinstance(p, TermsPart)]
            losses = _concat_losses([p.losses for p in terms_parts], self.batch_dim)
            terms = concat_terms([p.terms for p in terms_parts])
            return TermsPart(losses, first.params, terms, None, scale=first.scale)
        if isinstance(first, LossesPart):
            graphs = [p.graph_losses for p in parts if isinstance(p, LossesPart)]
            graph = _concat_losses(graphs, self.batch_dim)
            values = _concat_losses([p.losses for p in parts], self.batch_dim)
            return LossesPart(values, graph, scale=first.scale)
        return self.combine_grads([p for p in parts if isinstance(p, type(first))])  # type: ignore[misc]

    def apply(self, part: Part) -> StepRecord:
        if isinstance(part, TermsPart):
            gramian = self.gramian(part)
            weights = weights_for(self.weighting, gramian)
            self.write_grad(part, weights)
            return StepRecord(part.losses, weights, _gramian=lambda: gramian)
        if isinstance(part, LossesPart):
            weights = weights_for(self.weighting, placeholder_gramian(part.losses))
            retain = self._watched is not None
            torch.autograd.backward(part.graph_losses, weights, retain_graph=retain)
            return StepRecord(part.losses, weights)
        assert isinstance(part, type(part))
        return self.apply_grads(part)  # type: ignore[arg-type]

    def gramian(self, part: TermsPart) -> Tensor:
        """The Gramian of the part's losses, divided by the square of the loss scale."""
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        gramian = gramian_from_terms(part.terms, tuple(part.losses.shape), self.batch_dim, dtype)
        if part.scale != 1.0:
            gramian = gramian / part.scale**2
        check_gramian_finite(gramian)
        return gramian

    def write_grad(self, part: TermsPart, weights: Tensor) -> None:
        """Adds ``Σᵢ wᵢ ∇ℓᵢ`` for the part's losses to ``.grad``."""
        if part.graph_losses is not None:
            torch.autograd.backward(part.graph_losses, weights.to(part.graph_losses.dtype))
        else:
            grad_from_terms(
                list(zip(part.params, part.terms, strict=True)), weights, self.batch_dim
            )


def _aligned(part: TermsPart, first: TermsPart) -> TermsPart:
    """``part`` with its terms in the order of ``first``'s parameters."""
    by_param = {id(param): term for param, term in zip(part.params, part.terms, strict=True)}
    if set(by_param) != {id(param) for param in first.params}:
        raise ValueError(
            "The micro-batches of one step reached different parameters; every backward() of a "
            "step must run the same model."
        )
    terms = [by_param[id(param)] for param in first.params]
    return TermsPart(part.losses, first.params, terms, part.graph_losses, scale=part.scale)


def _concat_losses(losses: Sequence[Tensor], batch_dim: int) -> Tensor:
    dim = batch_dim % losses[0].ndim
    return torch.cat(list(losses), dim=dim)
