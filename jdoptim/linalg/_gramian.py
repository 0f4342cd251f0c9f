"""Gramian helpers: computing, flattening, normalising and regularising ``G = J Jᵀ``."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gramian_from_jacobian(jacobian: Tensor) -> Tensor:
    """Returns ``J Jᵀ`` for a Jacobian of shape ``[m, n]``, exactly symmetric."""
    gramian = jacobian @ jacobian.T
    return (gramian + gramian.T) / 2


def flatten_generalized_gramian(gramian: Tensor) -> Tensor:
    """Turns ``[m1, ..., mk, mk, ..., m1]`` into the ``[M, M]`` Gramian, ``M = m1 * ... * mk``.

    Entry ``G[i1, ..., ik, jk, ..., j1]`` is the inner product of the rows of ``J`` indexed by
    ``(i1, ..., ik)`` and ``(j1, ..., jk)``, so the second half of the dimensions is reversed
    before reshaping.
    """
    k = gramian.ndim // 2
    rows = math.prod(gramian.shape[:k])
    permutation = [*range(k), *range(gramian.ndim - 1, k - 1, -1)]
    return gramian.permute(permutation).reshape(rows, rows)


def reshape_gramian(gramian: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`flatten_generalized_gramian`: ``[M, M]`` to ``[*shape, *reversed(shape)]``."""
    k = len(shape)
    unflat = gramian.reshape((*shape, *shape))
    permutation = [*range(k), *range(2 * k - 1, k - 1, -1)]
    return unflat.permute(permutation)


def power_of_two_scale(tensor: Tensor) -> Tensor:
    """A power of two close to ``max |tensor|`` (1 for a zero tensor).

    Dividing by a power of two is exact in floating point, so it rescales huge or tiny values into a
    safe range without changing any digit.
    """
    largest = tensor.detach().abs().max() if tensor.numel() > 0 else tensor.new_zeros(())
    if not bool(largest > 0) or not bool(torch.isfinite(largest)):
        return tensor.new_ones(())
    return torch.exp2(torch.round(torch.log2(largest)))


def normalize_gramian(gramian: Tensor) -> Tensor:
    """Returns ``G / trace(G)``, or the zero matrix when ``G`` is zero.

    The trace is computed after an exact power-of-two rescaling, so that neither huge nor tiny
    Gramians overflow or underflow: the result only depends on the direction of ``G``.
    """
    scaled = gramian / power_of_two_scale(gramian.diagonal())
    trace = scaled.diagonal().sum()
    if not bool(trace > 0):
        return torch.zeros_like(gramian)
    return scaled / trace


def regularize_gramian(gramian: Tensor, eps: float) -> Tensor:
    """Returns ``G + eps * I``."""
    return gramian + eps * torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
