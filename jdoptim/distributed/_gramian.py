"""Instance-wise Gramian weightings across ranks: gathered term factors give the global Gramian."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from jdoptim.autogram import Term
from jdoptim.distributed._communicator import from_first_rank
from jdoptim.distributed._layout import Layout, StepKind, header
from jdoptim.distributed._path_base import DistributedPath, losses_of
from jdoptim.paths import (
    GramianPath,
    LossesPart,
    Part,
    StepRecord,
    TermsPart,
    placeholder_gramian,
    weights_for,
)


class DistributedGramianPath(DistributedPath):
    """Instance-wise Gramian weightings: gathered term factors give the global Gramian."""

    local: GramianPath

    def apply_across(self, part: Part) -> StepRecord:
        if isinstance(part, LossesPart):
            return self._shape_weights(part)
        comm = self.communicator
        kind = StepKind.ENGINE if not isinstance(part, LossesPart) else StepKind.WEIGHTS
        losses = losses_of(part)
        factors: list[Tensor] = []
        dims: list[int] = []
        if isinstance(part, TermsPart):
            part = self._in_parameter_order(part)
            for term in part.terms:
                for tensor, dim in term.factors():
                    factors.append(tensor)
                    dims.append(dim)
        layouts: list[Layout | None] = []
        gathered = comm.all_gather_padded(
            factors,
            dims,
            header=header(kind, losses),
            check=lambda h: layouts.append(self.layout(h)),
        )
        layout = layouts[0]
        if layout is None:
            return self.scalar_step(part)
        assert isinstance(part, TermsPart)
        global_terms = _rebuild(part, gathered)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        weights = part.losses.new_zeros(layout.shape, dtype=dtype)
        gramian = weights.new_zeros(())
        with comm.guard("the weighting"):
            gramian = self.local.gramian(global_terms, layout.shape, part.scale)
            weights = weights_for(self.local.weighting, gramian).to(dtype)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(part.losses.to(dtype))],
            kind="weights",
        )
        self.write_grads(part, layout.local_slice(weights).to(part.losses.dtype))
        final = gramian
        return StepRecord(global_losses.to(part.losses.dtype), weights, _gramian=lambda: final)

    def parameter_order(self) -> list[Tensor]:
        """The parameters in an order every rank shares (terms travel in it)."""
        return self.context.params()

    def _in_parameter_order(self, part: TermsPart) -> TermsPart:
        """``part`` with its terms in :meth:`parameter_order`.

        The engine lists terms in the order it walked the graph, which can differ between ranks
        (a batch of one instance runs other operations than a larger one), and each rank's
        factors are matched with the others' by position.
        """
        position = {id(p): index for index, p in enumerate(self.parameter_order())}
        order = sorted(
            range(len(part.params)), key=lambda i: position.get(id(part.params[i]), len(position))
        )
        return replace(
            part, params=[part.params[i] for i in order], terms=[part.terms[i] for i in order]
        )

    def write_grads(self, part: TermsPart, local_weights: Tensor) -> None:
        """Adds the direction to ``.grad``: this rank's weighted terms, summed over the ranks."""
        params = self.context.params()
        self.take_grads(params)
        with self.communicator.guard("the local gradients"):
            self.local.write_grad(part, local_weights)
        self.reduce_grads(params)

    def _shape_weights(self, part: LossesPart) -> StepRecord:
        """Weightings that ignore the Gramian: the global shape is all they need."""
        comm = self.communicator
        layout = self.layout(self.exchange_header(StepKind.WEIGHTS, part.losses))
        if layout is None:
            return self.scalar_step(part)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        weights = part.losses.new_zeros(layout.shape, dtype=dtype)
        with comm.guard("the weighting"):
            weights = weights_for(
                self.local.weighting, placeholder_gramian(part.losses.new_zeros(layout.shape))
            ).to(dtype)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(part.losses.to(dtype))],
            kind="weights",
        )
        params = self.context.params()
        self.take_grads(params)
        with comm.guard("the local gradients"):
            local = layout.local_slice(weights).to(part.graph_losses.dtype)
            torch.autograd.backward(part.graph_losses, local)
        self.reduce_grads(params)
        return StepRecord(global_losses.to(part.losses.dtype), weights)


def _rebuild(part: TermsPart, gathered: list[Tensor]) -> list[Term]:
    """The part's terms around the gathered (global) factors."""
    remaining = iter(gathered)
    terms = []
    for term in part.terms:
        count = len(term.factors())
        terms.append(term.with_factors([next(remaining) for _ in range(count)]))
    return terms
