"""Temporary bridge to the autogram term functions (replaced by jdoptim.autogram's public API)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.autogram._jacobian import row_order
from jdoptim.autogram._rules import EmbeddingTerm, MaterializedTerm, OuterTerm, Term
from jdoptim.linalg import reshape_gramian

_FACTORS: dict[type[Term], tuple[tuple[str, int], ...]] = {
    MaterializedTerm: (("rows", 0),),
    OuterTerm: (("a", 1), ("b", 0)),
    EmbeddingTerm: (("a", 1), ("idx", 0)),
}


def term_factors(term: Term) -> list[tuple[Tensor, int]]:
    return [(getattr(term, name), dim) for name, dim in _FACTORS[type(term)]]


def with_factors(term: Term, tensors: Sequence[Tensor]) -> Term:
    names = [name for name, _ in _FACTORS[type(term)]]
    return dataclasses.replace(term, **dict(zip(names, tensors, strict=True)))  # type: ignore[type-var]


def _materialized(term: Term) -> Term:
    if isinstance(term, MaterializedTerm):
        return term
    if isinstance(term, OuterTerm):
        tasks, batch = term.a.shape[0], term.a.shape[1]
        rows = torch.einsum("tbsk,bsd->btkd", term.a, term.b).reshape(batch * tasks, -1)
        return MaterializedTerm(rows, term.shape)
    assert isinstance(term, EmbeddingTerm)
    tasks, batch = term.a.shape[0], term.a.shape[1]
    eye = torch.eye(batch * tasks, dtype=term.a.dtype, device=term.a.device)
    rows = torch.stack(
        [term.weighted_grad(eye[r].reshape(batch, tasks)).reshape(-1) for r in range(batch * tasks)]
    )
    return MaterializedTerm(rows, term.shape)


def concat_terms(batches: Sequence[Sequence[Term]]) -> list[Term]:
    if len(batches) == 1:
        return list(batches[0])
    result = []
    for terms in zip(*batches, strict=True):
        if len({type(t) for t in terms}) > 1:
            terms = tuple(_materialized(t) for t in terms)
        factors = [term_factors(t) for t in terms]
        merged = []
        for index, (_, dim) in enumerate(factors[0]):
            tensors = [f[index][0] for f in factors]
            shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim)]
            padded = []
            for t in tensors:
                target = list(shape)
                target[dim] = t.shape[dim]
                if list(t.shape) != target:
                    z = t.new_zeros(target)
                    z[tuple(slice(0, s) for s in t.shape)] = t
                    t = z
                padded.append(t)
            merged.append(torch.cat(padded, dim=dim))
        result.append(with_factors(terms[0], merged))
    return result


def gramian_from_terms(
    terms: Sequence[Term], shape: tuple[int, ...], batch_dim: int | None, dtype: torch.dtype
) -> Tensor:
    rows = math.prod(shape)
    device = next(iter(term_factors(terms[0])))[0].device
    gramian = sum(
        (term.gramian().to(dtype) for term in terms),
        torch.zeros(rows, rows, dtype=dtype, device=device),
    )
    gramian = (gramian + gramian.T) / 2
    order = row_order(shape, batch_dim).to(device)
    natural = torch.empty_like(gramian)
    natural[order[:, None], order[None, :]] = gramian
    if not shape:
        return natural.reshape(())
    return reshape_gramian(natural, shape)


def grad_from_terms(
    pairs: Sequence[tuple[Tensor, Term]], weights: Tensor, batch_dim: int | None
) -> None:
    weights = weights.detach()
    if batch_dim is None:
        rows = weights.reshape(-1, 1)
    else:
        moved = weights.movedim(batch_dim, 0)
        rows = moved.reshape(moved.shape[0], -1)
    for param, term in pairs:
        grad = term.weighted_grad(rows).to(param.dtype)
        param.grad = grad if param.grad is None else param.grad + grad


def instance_major_order(shape: tuple[int, ...], batch_dim: int | None) -> Tensor:
    return row_order(shape, batch_dim)
