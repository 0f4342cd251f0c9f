"""From per-parameter terms to the Gramian of the losses and to ``.grad``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.autogram._terms import Term
from jdoptim.linalg import reshape_gramian


def instance_major_order(shape: tuple[int, ...], batch_dim: int | None) -> Tensor:
    """Flat index, in a tensor of ``shape``, of each instance-major row.

    Row ``r`` of a term is entry ``order[r]`` of the flattened losses: the instance along
    ``batch_dim`` first, then the other dims in order (``batch_dim=None``: the flat order).
    """
    index = torch.arange(math.prod(shape)).reshape(shape)
    if batch_dim is None:
        return index.reshape(-1)
    return index.movedim(batch_dim, 0).reshape(-1)


def gramian_from_terms(
    terms: Sequence[Term],
    shape: tuple[int, ...],
    batch_dim: int | None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The generalized Gramian ``[*shape, *reversed(shape)]`` of losses of ``shape``.

    Sums the terms' Gramians (in ``dtype``; default: the terms' dtype, at least float32),
    symmetrises the sum, and moves its instance-major rows (instance along ``batch_dim``) to the
    losses' own layout. A 0-d ``shape`` gives a 0-d Gramian.
    """
    if not terms:
        raise ValueError("gramian_from_terms needs at least one term.")
    batch_dim = _normalized(batch_dim, shape)
    rows = math.prod(shape)
    gramians = [term.gramian() for term in terms]
    for term, gramian in zip(terms, gramians, strict=True):
        if tuple(gramian.shape) != (rows, rows):
            raise ValueError(
                f"A {type(term).__name__} has {gramian.shape[0]} rows, but losses of shape {shape} "
                f"have {rows}: the terms do not belong to these losses."
            )
    if dtype is None:
        dtype = torch.promote_types(gramians[0].dtype, torch.float32)
    device = gramians[0].device
    total = sum(
        (gramian.to(dtype) for gramian in gramians),
        torch.zeros(rows, rows, dtype=dtype, device=device),
    )
    total = (total + total.T) / 2
    order = instance_major_order(shape, batch_dim).to(device)
    natural = torch.empty_like(total)
    natural[order[:, None], order[None, :]] = total
    if not shape:
        return natural.reshape(())
    return reshape_gramian(natural, shape)


def grad_from_terms(
    pairs: Sequence[tuple[Tensor, Term]], weights: Tensor, batch_dim: int | None
) -> None:
    """Adds ``Σᵢ wᵢ ∂lossᵢ/∂θ`` to ``θ.grad`` for each ``(θ, term)``.

    ``weights`` has the losses' shape, with instances along ``batch_dim``.
    """
    shape = tuple(weights.shape)
    batch_dim = _normalized(batch_dim, shape)
    weights = weights.detach()
    if batch_dim is None:
        rows = weights.reshape(-1, 1)
    else:
        moved = weights.movedim(batch_dim, 0)
        rows = moved.reshape(moved.shape[0], -1)
    for param, term in pairs:
        grad = term.weighted_grad(rows).to(param.dtype)
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


def _normalized(batch_dim: int | None, shape: tuple[int, ...]) -> int | None:
    if batch_dim is None:
        return None
    if not -len(shape) <= batch_dim < len(shape):
        raise ValueError(f"batch_dim={batch_dim} is out of range for losses of shape {shape}.")
    return batch_dim % len(shape)
