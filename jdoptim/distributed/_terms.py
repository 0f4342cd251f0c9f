"""The Gramian of the global batch from every rank's Gramian terms.

The autogram engine describes each parameter's part of the Jacobian by a term in factored form:
for a ``Linear`` layer, the output gradients ``a`` and inputs ``b`` of every instance (per-instance
gradient ``gᵢ = Σₛ aᵢₛ ⊗ bᵢₛ``); for other parameters, the per-instance gradient rows. The factors
of independent instances are independent, so concatenating every rank's factors along the instance
dim gives the factors of the concatenated batch, and their term's Gramian has every cross-rank
block. For a linear layer this sends ``B·S·(k + d)`` numbers per rank instead of the ``B·k·d``
of per-instance gradients.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from jdoptim.autogram._rules import EmbeddingTerm, MaterializedTerm, OuterTerm, Term
from jdoptim.linalg import reshape_gramian

# Per term type: its factor fields and the dim of each that indexes instances (rows).
_FACTORS: dict[type[Term], tuple[tuple[str, int], ...]] = {
    MaterializedTerm: (("rows", 0),),
    OuterTerm: (("a", 1), ("b", 0)),
    EmbeddingTerm: (("a", 1), ("idx", 0)),
}


def term_factors(terms: list[Term]) -> tuple[list[Tensor], list[int]]:
    """The factor tensors of ``terms`` in order, and the instance dim of each."""
    tensors: list[Tensor] = []
    dims: list[int] = []
    for term in terms:
        for name, dim in _factor_fields(term):
            tensors.append(getattr(term, name))
            dims.append(dim)
    return tensors, dims


def with_factors(terms: list[Term], factors: list[Tensor]) -> list[Term]:
    """``terms`` rebuilt around new factors (in :func:`term_factors` order)."""
    remaining = iter(factors)
    return [
        dataclasses.replace(term, **{name: next(remaining) for name, _ in _factor_fields(term)})  # type: ignore[type-var]
        for term in terms
    ]


def _factor_fields(term: Term) -> tuple[tuple[str, int], ...]:
    fields = _FACTORS.get(type(term))
    if fields is None:
        raise TypeError(
            f"Distributed steps do not know how to exchange the Gramian term {type(term).__name__}; "
            "use batch_dim=None for this model (exact per-instance Jacobian rows are exchanged)."
        )
    return fields


def global_gramian(
    terms: list[Term],
    shape: tuple[int, ...],
    batch_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The generalized Gramian of the global losses of ``shape`` from the gathered terms.

    Term rows are instance-major (instance along ``batch_dim``, then the other dims in order);
    the result is indexed like the losses, ``[*shape, *reversed(shape)]``.
    """
    rows = 1
    for size in shape:
        rows *= size
    zero = torch.zeros(rows, rows, dtype=dtype, device=device)
    gramian = sum((term.gramian().to(dtype) for term in terms), zero)
    gramian = (gramian + gramian.T) / 2
    order = torch.arange(rows, device=device).reshape(shape).movedim(batch_dim, 0).reshape(-1)
    natural = torch.empty_like(gramian)
    natural[order[:, None], order[None, :]] = gramian
    return reshape_gramian(natural, shape)
