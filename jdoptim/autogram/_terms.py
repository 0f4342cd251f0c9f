"""Gramian terms: one parameter's part of a Jacobian, kept in factored form.

A term describes the per-row gradients ``gᵣ`` of one parameter (rows indexed ``(i, t)``,
instance-major: instance ``i``, then the other entries ``t`` of the differentiated output) without
storing them when a cheaper form exists. From it come the parameter's contribution ``Jₚ Jₚᵀ`` to
the Gramian and its weighted gradient ``Σᵣ wᵣ gᵣ`` (the fused ``.grad`` path).

Every term is built from *factor* tensors, each with one dim that indexes instances. The factors of
independent instances are independent, so concatenating the factors of several batches along that
dim gives the term of the concatenated batch (:func:`concat_terms`): that is how micro-batches and
ranks are combined exactly.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest [rows * positions]² kernel the pairwise form may build (elements).
_MAX_PAIRWISE_ELEMENTS = 2**26
# Materialised per-row gradients are kept for the weighted gradient when they hold at most this
# many times the elements of the term's factors (which the term holds anyway).
_CACHED_ROWS_RATIO = 4


class Route(str, Enum):
    """How a parameter's term was obtained (compares equal to its value, e.g. ``"exact"``)."""

    CLOSED_FORM = "closed_form"  # a layer rule on saved inputs and output gradients
    REPLAY = "replay"  # the layer re-run per instance under torch.func.vmap
    LOCAL = "local"  # exact per-instance VJPs of one module call's own graph
    EXACT = "exact"  # per-row autograd on the whole graph

    def __str__(self) -> str:
        return self.value


class Term(ABC):
    """The part of the Jacobian that belongs to one parameter, in whatever form is cheapest.

    ``M = B * T`` rows, instance-major. Subclasses are dataclasses of factor tensors (see
    :meth:`factors`) plus the parameter's shape; the per-row gradients are linear in each
    floating-point factor.
    """

    route: Route = Route.CLOSED_FORM

    @property
    def form(self) -> str:
        """How :meth:`gramian` proceeds: ``"rows"`` (products of stored per-row gradients),
        ``"pairwise"`` (from the factors' pairwise products, no per-row gradient formed) or
        ``"materialized"`` (per-row gradients formed from the factors, then their products)."""
        return "rows"

    @abstractmethod
    def gramian(self) -> Tensor:
        """``Jₚ Jₚᵀ``, ``[M, M]``, rows instance-major."""

    @abstractmethod
    def weighted_grad(self, weights: Tensor) -> Tensor:
        """``Σᵢₜ wᵢₜ gᵢₜ`` in the parameter's shape, for weights ``[B, T]``."""

    @abstractmethod
    def factors(self) -> list[tuple[Tensor, int]]:
        """The factor tensors, each with the dim that indexes instances."""

    def with_factors(self, tensors: Sequence[Tensor]) -> Term:
        """The same term around new factor tensors (in :meth:`factors` order)."""
        names = self._factor_names()
        if len(tensors) != len(names):
            raise ValueError(
                f"{type(self).__name__} has {len(names)} factors, got {len(tensors)} tensors."
            )
        changes = dict(zip(names, tensors, strict=True))
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @abstractmethod
    def _factor_names(self) -> tuple[str, ...]:
        """The dataclass fields holding the factors, in :meth:`factors` order."""


@dataclass
class MaterializedTerm(Term):
    """Per-row gradients stored as ``[M, n]`` (rows instance-major).

    With ``sparse``, the weighted gradient is a sparse COO tensor over the first dim (the layout
    autograd gives an ``nn.Embedding(sparse=True)`` table).
    """

    rows: Tensor
    shape: tuple[int, ...]
    route: Route = Route.CLOSED_FORM
    sparse: bool = False

    def gramian(self) -> Tensor:
        return self.rows @ self.rows.T

    def weighted_grad(self, weights: Tensor) -> Tensor:
        grad = (weights.reshape(-1).to(self.rows.dtype) @ self.rows).reshape(self.shape)
        return grad.to_sparse(sparse_dim=1) if self.sparse else grad

    def factors(self) -> list[tuple[Tensor, int]]:
        return [(self.rows, 0)]

    def _factor_names(self) -> tuple[str, ...]:
        return ("rows",)


@dataclass
class OuterTerm(Term):
    """Per-row gradients ``g[i, t] = Σₛ a[t, i, s] ⊗ b[i, s]`` kept in factored form.

    Two exact ways give its Gramian (the layer-wise choice of "mixed ghost clipping", Bu, Mao & Xu,
    *Scalable and Efficient Training of Large Convolutional Neural Networks with Differential
    Privacy*, NeurIPS 2022), and :attr:`form` is the one with fewer multiply-adds for the term's
    shapes (:meth:`costs`):

    - ``"pairwise"``: ``G[(i,t),(j,u)] = Σₛᵣ (b[i,s]·b[j,r]) (a[t,i,s]·a[u,j,r])``, about
      ``(B·S)²·d + (M·S)²·k`` (``M = B·T`` rows, ``S`` positions), never forming ``gᵢₜ``; the
      weighted gradient then costs a pass over the factors, ``M·S·k + B·S·k·d``;
    - ``"materialized"``: the ``M`` per-row gradients ``[M, k·d]`` (``M·S·k·d``) and their
      products (``M²·k·d``); the weighted gradient is then ``wᵀ`` times them (``M·k·d``).

    The pairwise form also needs ``(M·S)²`` elements of memory, and is not used above
    ``_MAX_PAIRWISE_ELEMENTS``. The materialised rows are kept for :meth:`weighted_grad` when they
    hold at most ``_CACHED_ROWS_RATIO`` times the factors' elements.
    """

    a: Tensor  # [T, B, S, k]
    b: Tensor  # [B, S, d]
    shape: tuple[int, ...]
    route: Route = Route.CLOSED_FORM
    _rows: Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def costs(self) -> tuple[int, int]:
        """Multiply-adds of the Gramian plus the weighted gradient: ``(pairwise, materialized)``."""
        tasks, batch, positions, k = self.a.shape
        d = self.b.shape[-1]
        rows = batch * tasks
        pairwise = (
            (batch * positions) ** 2 * d
            + (rows * positions) ** 2 * k
            + rows * positions * k
            + batch * positions * k * d
        )
        materialized = rows * positions * k * d + rows * rows * k * d + rows * k * d
        return pairwise, materialized

    @property
    def form(self) -> str:
        """``"pairwise"`` or ``"materialized"``: how :meth:`gramian` proceeds (see the class)."""
        tasks, batch, positions, _ = self.a.shape
        pairwise, materialized = self.costs()
        fits = (batch * tasks * positions) ** 2 <= _MAX_PAIRWISE_ELEMENTS
        return "pairwise" if fits and pairwise <= materialized else "materialized"

    def gramian(self, *, with_bias: bool = False) -> Tensor:
        """``Jₚ Jₚᵀ``; with ``with_bias`` (pairwise form only), plus the Gramian of the bias term
        on the same ``a`` (:class:`BiasTerm`): a bias is a weight on a constant input 1, so both
        come from the one kernel ``b bᵀ + 1``."""
        tasks, batch, positions, k = self.a.shape
        d = self.b.shape[-1]
        if self.form == "pairwise":
            b_flat = self.b.reshape(batch * positions, d)
            kernel = b_flat @ b_flat.T
            return _pairwise_kernel_gramian(self.a, kernel.add_(1) if with_bias else kernel)
        if with_bias:
            raise ValueError("OuterTerm.gramian(with_bias=True) needs the pairwise form.")
        per_row = torch.einsum("tbsk,bsd->btkd", self.a, self.b).reshape(batch * tasks, k * d)
        if per_row.numel() <= _CACHED_ROWS_RATIO * (self.a.numel() + self.b.numel()):
            self._rows = per_row
        return per_row @ per_row.T

    def weighted_grad(self, weights: Tensor) -> Tensor:
        rows = self._rows
        if rows is not None:
            return (weights.reshape(-1).to(rows.dtype) @ rows).reshape(self.shape)
        weighted = _weighted_output_gradients(self.a, weights)
        k, d = weighted.shape[-1], self.b.shape[-1]
        return (weighted.reshape(-1, k).T @ self.b.reshape(-1, d)).reshape(self.shape)

    def factors(self) -> list[tuple[Tensor, int]]:
        return [(self.a, 1), (self.b, 0)]

    def _factor_names(self) -> tuple[str, ...]:
        return ("a", "b")


@dataclass
class BiasTerm(Term):
    """Per-row gradients ``g[i, t] = Σₛ a[t, i, s]``: a bias added at every position of a layer's
    output, kept as that output's gradient ``a [T, B, S, k]``.

    The layer's weight term (:class:`OuterTerm`) holds the same ``a``; :func:`term_gramians` then
    forms both Gramians from one product.
    """

    a: Tensor  # [T, B, S, k]
    shape: tuple[int, ...]
    route: Route = Route.CLOSED_FORM
    _rows: Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def rows(self) -> Tensor:
        """The per-row gradients ``[M, k]``, instance-major (summed once, then kept)."""
        if self._rows is None:
            # [T, B, k]; one position (a Linear on [B, d] inputs) needs no summing pass
            sums = self.a.select(2, 0) if self.a.shape[2] == 1 else self.a.sum(dim=2)
            self._rows = sums.transpose(0, 1).reshape(-1, sums.shape[-1])
        return self._rows

    def gramian(self) -> Tensor:
        rows = self.rows()
        return rows @ rows.T

    def weighted_grad(self, weights: Tensor) -> Tensor:
        # A sum then a product: einsum over (t, b, s) was 30x slower here on a convolution's a.
        rows = self.rows()
        return (weights.reshape(-1).to(rows.dtype) @ rows).reshape(self.shape)

    def factors(self) -> list[tuple[Tensor, int]]:
        return [(self.a, 1)]

    def _factor_names(self) -> tuple[str, ...]:
        return ("a",)


def term_gramians(terms: Sequence[Term]) -> list[Tensor | None]:
    """Each term's Gramian ``Jₚ Jₚᵀ``, with every :class:`BiasTerm` whose ``a`` is the very tensor of
    an :class:`OuterTerm` in pairwise form folded into that term's Gramian (``None`` in its place):
    the sum of the list is unchanged, and the bias costs no product of its own."""
    weights = {
        id(term.a): index
        for index, term in enumerate(terms)
        if isinstance(term, OuterTerm) and term.form == "pairwise"
    }
    folded: dict[int, int] = {}  # weight index -> bias index
    for index, term in enumerate(terms):
        owner = weights.get(id(term.a)) if isinstance(term, BiasTerm) else None
        if owner is not None and owner not in folded:
            folded[owner] = index
    skipped = set(folded.values())
    result: list[Tensor | None] = []
    for index, term in enumerate(terms):
        if index in skipped:
            result.append(None)
        elif index in folded:
            assert isinstance(term, OuterTerm)
            result.append(term.gramian(with_bias=True))
        else:
            result.append(term.gramian())
    return result


@dataclass
class EmbeddingTerm(Term):
    """``g[i, t] = Σₛ onehot(idx[i, s]) ⊗ a[t, i, s]``: rows of an embedding table.

    With ``sparse``, the weighted gradient is a sparse COO tensor, as autograd gives for
    ``nn.Embedding(sparse=True)``.
    """

    a: Tensor  # [T, B, S, k], zero where idx is the padding index
    idx: Tensor  # [B, S]
    shape: tuple[int, ...]
    route: Route = Route.CLOSED_FORM
    sparse: bool = False

    @property
    def form(self) -> str:
        return "pairwise"

    def gramian(self) -> Tensor:
        flat = self.idx.reshape(-1)
        same_row = (flat[:, None] == flat[None, :]).to(self.a.dtype)
        return _pairwise_kernel_gramian(self.a, same_row)

    def weighted_grad(self, weights: Tensor) -> Tensor:
        weighted = _weighted_output_gradients(self.a, weights)
        rows = weighted.reshape(-1, self.shape[-1])
        if self.sparse:
            index = self.idx.reshape(1, -1)
            return torch.sparse_coo_tensor(index, rows, self.shape, check_invariants=False)
        return weighted.new_zeros(self.shape).index_add_(0, self.idx.reshape(-1), rows)

    def factors(self) -> list[tuple[Tensor, int]]:
        return [(self.a, 1), (self.idx, 0)]

    def _factor_names(self) -> tuple[str, ...]:
        return ("a", "idx")


def _weighted_output_gradients(a: Tensor, weights: Tensor) -> Tensor:
    """``Σₜ w[b, t] a[t, b, s, k]``, ``[B, S, k]``: one product for a single task (the usual case),
    where the general contraction costs several reshaping operations more."""
    weights = weights.to(a.dtype)
    if a.shape[0] == 1:
        return a[0] * weights[:, :1, None]
    return torch.einsum("tbsk,bt->bsk", a, weights)


def _pairwise_kernel_gramian(a: Tensor, kernel: Tensor) -> Tensor:
    """``G[(i,t),(j,u)] = Σₛᵣ K[(i,s),(j,r)] (a[t,i,s]·a[u,j,r])``, never forming per-row gradients."""
    tasks, batch, positions, k = a.shape
    if tasks == 1 and positions == 1:  # one row per instance: a Hadamard product of two Gramians
        rows = a.reshape(batch, k)
        return (rows @ rows.T) * kernel
    a_rows = a.permute(1, 0, 2, 3).reshape(batch * tasks * positions, k)
    products = (a_rows @ a_rows.T).view(batch, tasks, positions, batch, tasks, positions)
    products = products * kernel.view(batch, 1, positions, batch, 1, positions)
    return products.sum(dim=(2, 5)).reshape(batch * tasks, batch * tasks)


def distinct_factors(terms: Sequence[Term]) -> tuple[list[Tensor], list[int], list[int]]:
    """The terms' factor tensors with each distinct one once (a tensor several terms share, such as
    a bias's and its weight's output gradients, counts once), their instance dims, and for every
    factor of every term, in order, its position in that list."""
    position: dict[tuple[int, int], int] = {}  # (id of a live factor, its dim) -> position
    tensors: list[Tensor] = []
    dims: list[int] = []
    slots: list[int] = []
    for term in terms:
        for tensor, dim in term.factors():
            key = (id(tensor), dim)
            if key not in position:
                position[key] = len(tensors)
                tensors.append(tensor)
                dims.append(dim)
            slots.append(position[key])
    return tensors, dims, slots


def concat_terms(batches: Sequence[Sequence[Term]]) -> list[Term]:
    """The terms of several batches concatenated along the instance dim (batch 0's first).

    The ``k``-th term of every batch belongs to the same parameter. Factors are concatenated along
    their instance dim; where another dim differs (positions, e.g. sequence length), the smaller
    ones are zero-padded, and a zero factor entry adds nothing to any term (an embedding's padded
    positions have zero output gradients, whatever index they point to). Exact: the result's
    Gramian is ``J Jᵀ`` of the concatenated batch, with every cross-batch block.
    """
    if not batches:
        raise ValueError("concat_terms needs at least one batch of terms.")
    count = len(batches[0])
    if any(len(terms) != count for terms in batches):
        sizes = [len(terms) for terms in batches]
        raise ValueError(
            f"Every batch must have one term per parameter, in the same order; got {sizes} terms."
        )
    result: list[Term] = []
    # Factors shared by several terms of a batch (a bias's and its weight's output gradients) stay
    # shared once concatenated, so the concatenated terms are folded as a whole batch's would be.
    joined: dict[tuple[tuple[int, int], ...], Tensor] = {}  # (id, dim) of the live parts -> join
    for index in range(count):
        group = [terms[index] for terms in batches]
        first = group[0]
        if any(type(term) is not type(first) for term in group):
            kinds = sorted({type(term).__name__ for term in group})
            raise ValueError(
                f"Term {index} has different types across batches ({', '.join(kinds)}); the batches "
                "must come from the same model, with the same engine routes."
            )
        tensors = []
        for parts in zip(*(term.factors() for term in group), strict=True):
            key = tuple((id(tensor), dim) for tensor, dim in parts)
            if key not in joined:
                joined[key] = _concat_padded(list(parts))
            tensors.append(joined[key])
        result.append(first.with_factors(tensors))
    return result


def _concat_padded(factors: list[tuple[Tensor, int]]) -> Tensor:
    tensors = [tensor for tensor, _ in factors]
    dim = factors[0][1]
    if len(tensors) == 1:
        return tensors[0]
    if any(t.ndim != tensors[0].ndim for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"Factors of one term have different ranks across batches: {shapes}.")
    largest = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
    padded = []
    for tensor in tensors:
        pad: list[int] = []
        for d in reversed(range(tensor.ndim)):
            pad += [0, 0 if d == dim else largest[d] - tensor.shape[d]]
        padded.append(F.pad(tensor, pad) if any(pad) else tensor)
    return torch.cat(padded, dim=dim)
