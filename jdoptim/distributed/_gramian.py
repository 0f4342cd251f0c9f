"""Instance-wise Gramian weightings across ranks: gathered term factors give the global Gramian."""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import torch
from torch import Tensor

from jdoptim.autogram import MaterializedTerm, Term, distinct_factors
from jdoptim.distributed._communicator import from_first_rank
from jdoptim.distributed._layout import Layout, StepKind, form_code, forms_digest, header
from jdoptim.distributed._path_base import (
    DistributedPath,
    check_shared,
    losses_of,
    overflow_as_nan,
)
from jdoptim.paths import (
    GramianPath,
    LossesPart,
    NonFiniteGramianError,
    Part,
    StepRecord,
    TermsPart,
    placeholder_gramian,
    term_rows,
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
        if isinstance(part, TermsPart):
            part = self._in_parameter_order(part)
        try:
            gathered, layout = self._gather_factors(part, kind, losses, agreed=False)
        except _FormsDiffer:
            assert isinstance(part, TermsPart)
            part = self._with_agreed_forms(part)
            gathered, layout = self._gather_factors(part, kind, losses, agreed=True)
        if layout is None:
            return self.scalar_step(part)
        assert isinstance(part, TermsPart)
        global_terms = _rebuild(part.terms, gathered)
        dtype = torch.promote_types(part.losses.dtype, torch.float32)
        weights = part.losses.new_zeros(layout.shape, dtype=dtype)
        gramian = weights.new_zeros(())
        with comm.guard("the weighting"):
            try:
                gramian = self.local.gramian(global_terms, layout.shape, part.scale)
                weights = weights_for(self.local.weighting, gramian, instances=True).to(dtype)
            except NonFiniteGramianError:
                weights = overflow_as_nan(weights)
        weights, global_losses = comm.all_reduce_sum(
            [from_first_rank(weights, comm.rank), layout.place(part.losses.to(dtype))],
            kind="weights",
        )
        check_shared([weights], "weights")
        self.write_grads(part, layout.local_slice(weights).to(part.losses.dtype))
        final = gramian
        return StepRecord(global_losses.to(part.losses.dtype), weights, _gramian=lambda: final)

    def _gather_factors(
        self, part: Part, kind: StepKind, losses: Tensor | None, agreed: bool
    ) -> tuple[list[Tensor], Layout | None]:
        """Every rank's term factors, concatenated along instances, in the terms' order, and the
        global layout. A factor that several terms share (a bias's and its weight's output
        gradients) travels once, and its global tensor is shared by the same terms again.

        Raises :class:`_FormsDiffer` on every rank, before any factor moves, when the ranks' terms
        take different forms (``agreed``: after :meth:`_with_agreed_forms`, a ``ValueError``).
        """
        terms = part.terms if isinstance(part, TermsPart) else []
        factors, dims, slots = distinct_factors(terms)
        # The parameters, the forms and the sharing must match between ranks for the factors to
        # line up (ranks whose instances took different layers reach different parameters).
        places = self._places(part.params) if isinstance(part, TermsPart) else []
        digest = zlib.crc32(repr((slots, places)).encode(), forms_digest(terms))
        layouts: list[Layout | None] = []

        def check(headers: list[list[int]]) -> None:
            layouts.append(self.layout(headers))
            if layouts[0] is None or len({h[-1] for h in headers}) == 1:
                return
            if not agreed:
                raise _FormsDiffer
            raise ValueError(
                "The ranks' engines formed terms for different parameters: every rank must run "
                "the same model, through the same layers."
            )

        gathered = self.communicator.all_gather_padded(
            factors, dims, header=header(kind, losses, digest, self.method_code), check=check
        )
        return [gathered[slot] for slot in slots], layouts[0]

    def _with_agreed_forms(self, part: TermsPart) -> TermsPart:
        """``part`` with per-row gradients for each parameter whose term form differs between
        ranks (a rank with a single instance, or whose independence check sent a layer to
        another exact route, forms some terms otherwise), and zero rows for each parameter that
        other ranks' instances reached and this rank's did not (a branch its batch did not take).
        Exact; costs three small exchanges."""
        comm = self.communicator
        part = self._with_every_ranks_parameters(part)
        if len({row[0] for row in comm.exchange_ints([len(part.terms)])}) > 1:
            raise ValueError(
                "The ranks' engines formed terms for different numbers of parameters: every rank "
                "must run the same model, through the same layers."
            )
        codes = comm.exchange_ints([form_code(term) for term in part.terms])
        terms = [
            term_rows(term) if len({row[index] for row in codes}) > 1 else term
            for index, term in enumerate(part.terms)
        ]
        return replace(part, terms=terms)

    def _with_every_ranks_parameters(self, part: TermsPart) -> TermsPart:
        """``part`` with a zero term for each parameter only other ranks' instances reached: their
        gradient of this rank's losses is zero, and every rank's terms then line up."""
        order = self.parameter_order()
        reached = [0] * len(order)
        for place in self._places(part.params):
            if place >= 0:  # (every rank takes part in the exchange below, whatever it holds)
                reached[place] = 1
        anywhere = [
            max(column) for column in zip(*self.communicator.exchange_ints(reached), strict=True)
        ]
        missing = [
            order[i]
            for i, (here, any_rank) in enumerate(zip(reached, anywhere, strict=True))
            if any_rank and not here
        ]
        if not missing:
            return part
        rows = part.losses.numel()
        dtype = part.terms[0].factors()[0][0].dtype if part.terms else missing[0].dtype
        zeros = [
            MaterializedTerm(
                torch.zeros(rows, p.numel(), dtype=dtype, device=p.device), tuple(p.shape)
            )
            for p in missing
        ]
        extended = replace(part, params=[*part.params, *missing], terms=[*part.terms, *zeros])
        return self._in_parameter_order(extended)

    def _places(self, params: list[Tensor]) -> list[int]:
        """Each parameter's place in :meth:`parameter_order` (-1: not one of them)."""
        position = {id(p): index for index, p in enumerate(self.parameter_order())}
        return [position.get(id(p), -1) for p in params]

    def parameter_order(self) -> list[Tensor]:
        """The parameters in an order every rank shares (terms travel in it)."""
        return self.context.params()

    def _in_parameter_order(self, part: TermsPart) -> TermsPart:
        """``part`` with its terms in :meth:`parameter_order`.

        The engine lists terms in the order it walked the graph, which can differ between ranks
        (a batch of one instance runs other operations than a larger one), and each rank's
        factors are matched with the others' by position.
        """
        # A term outside the optimizer's parameters (place -1) goes last.
        places = [place if place >= 0 else math.inf for place in self._places(part.params)]
        order = sorted(range(len(part.params)), key=places.__getitem__)
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


def _rebuild(terms: list[Term], gathered: list[Tensor]) -> list[Term]:
    """The terms around the gathered (global) factors, given in the terms' order."""
    remaining = iter(gathered)
    return [term.with_factors([next(remaining) for _ in term.factors()]) for term in terms]


class _FormsDiffer(Exception):
    """Raised alike on every rank when the ranks' term forms differ (see ``_with_agreed_forms``)."""
