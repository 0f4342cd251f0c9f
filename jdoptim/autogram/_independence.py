"""Checking numerically that the losses are independent across the batch dim.

The fast routes read instance ``i``'s gradient at a layer output ``Y`` off slice ``i`` of the
gradient of the summed losses. That is exact if and only if ``∂lossᵢ/∂Y`` vanishes outside slice
``i`` (for every ``i``), a property of the whole graph between ``Y`` and the losses that can change
from one forward pass to the next; so it is established on every pass, at every output the fast
routes use, and where it fails the parameters take an exact route. Most passes prove it from the
graph's structure (:mod:`jdoptim.autogram._structure`); the probes below decide on the others.

**Scaling probe** (one or two extra rows of the batched backward pass). Row ``p``
weights instance ``i``'s losses by ``uₚᵢ = ±2^eᵢ``; the rows give every instance a different
combination of (sign, exponent). Backward passes are linear in their cotangent, and multiplying by a
power of two or flipping a sign commutes exactly with floating-point rounding, so if the
independence holds, slice ``i`` of the probe's gradient equals ``uₚᵢ`` times slice ``i`` of the
plain gradient *bit for bit*. If a loss ``j ≠ i`` reaches slice ``i``, that slice differs by
``Σⱼ (uₚⱼ - uₚᵢ) ∂lossⱼ/∂Yᵢ``, which is nonzero because some row separates the two instances.

**Mask probe** (only for outputs the scaling probe did not clear, e.g. after an overflow or on
kernels whose rounding depends on the row). For each bit ``b`` of the instance index, the losses of
the instances whose bit ``b`` is 1, then those whose bit is 0: each row's gradient must be exactly
zero on the other instances' slices. Every pair of instances differs in some bit, so this proves
independence with exact zeros, at ``2⌈log₂ B⌉`` rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Exponents of the scaling probe: 2^0 .. 2^(n-1). Float16 gradients overflow early.
_EXPONENTS = 64
_HALF_EXPONENTS = 8


def scaling_weights(batch: int, half: bool, generator: torch.Generator) -> Tensor:
    """``[P, B]`` weights ``±2^e`` such that no two instances get the same weight in every row.

    The assignment of (sign, exponent) pairs to instances is a fresh random permutation on each
    call, so that no fixed pattern of losses can cancel the probe.
    """
    values = 2 * (_HALF_EXPONENTS if half else _EXPONENTS)
    rows = max(1, math.ceil(math.log(batch) / math.log(values) - 1e-9))
    code = torch.randperm(batch, generator=generator)
    weights = []
    for _ in range(rows):
        digit = code % values
        code = code // values
        sign = 1.0 - 2.0 * (digit % 2).double()
        weights.append(sign * torch.exp2((digit // 2).double()))
    return torch.stack(weights)


def scaled_dims(
    task_grads: list[Tensor],
    probe_grads: list[Tensor],
    weights: Tensor,
    candidates: list[list[int]],
) -> list[int | None]:
    """Per output, the first candidate dim along which the scaling probe holds bit for bit.

    ``task_grads[k]`` is ``[T, *y.shape]``; ``probe_grads[k]`` is ``[P * T, *y.shape]``, row
    ``p * T + t`` being task ``t``'s losses weighted by ``weights[p]``.
    """
    converted: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def check(index: int, dim: int) -> Tensor:
        plain, probed = task_grads[index], probe_grads[index]
        key = (plain.device, plain.dtype)
        if key not in converted:
            converted[key] = weights.to(plain.device, plain.dtype)
        # [P, T, *y.shape]: every probe row against the plain gradient, in three operations.
        expected = probed.reshape(weights.shape[0], *plain.shape)
        scale = _along(converted[key], dim, plain.ndim)
        return (plain * scale == expected).all()  # NaN never passes

    # The first candidate of every output holds almost always (the instance dim is the leading
    # one): check those first, and the other candidates only of the outputs where it failed.
    first = [(index, dims[0]) for index, dims in enumerate(candidates) if dims]
    result = _first_passing([check(*owner) for owner in first], first, len(task_grads))
    rest = [
        (index, dim)
        for index, dims in enumerate(candidates)
        if dims and result[index] is None
        for dim in dims[1:]
    ]
    if rest:
        later = _first_passing([check(*owner) for owner in rest], rest, len(task_grads))
        result = [a if a is not None else b for a, b in zip(result, later, strict=True)]
    return result


def bit_masks(batch: int) -> Tensor:
    """``[2R, B]`` booleans: per bit ``b`` of the instance index, the instances with bit 1, then 0."""
    bits = max(1, math.ceil(math.log2(batch)))
    index = torch.arange(batch)
    masks = []
    for b in range(bits):
        ones = (index >> b) & 1 == 1
        masks += [ones, ~ones]
    return torch.stack(masks)


def masked_dims(
    grads: list[Tensor], masks: Tensor, candidates: list[list[int]]
) -> list[int | None]:
    """Per output, the first candidate dim on which every mask row's gradient is zero outside it.

    ``grads[k]`` is ``[2R, *y.shape]``, row ``r`` the gradient of the summed losses of the
    instances in ``masks[r]``.
    """
    checks: list[Tensor] = []
    owners: list[tuple[int, int]] = []
    for index, (grad, dims) in enumerate(zip(grads, candidates, strict=True)):
        outside = ~masks.to(grad.device)
        for dim in dims:
            shape = [1] * grad.ndim
            shape[0], shape[1 + dim] = outside.shape[0], outside.shape[1]
            leaked = (grad != 0) & outside.view(shape)
            checks.append(~leaked.any())
            owners.append((index, dim))
    return _first_passing(checks, owners, len(grads))


def _first_passing(
    checks: list[Tensor], owners: list[tuple[int, int]], count: int
) -> list[int | None]:
    dims: list[int | None] = [None] * count
    if not checks:
        return dims
    verdicts: list[bool] = torch.stack(checks).tolist()  # one host sync for every output
    for (index, dim), passed in zip(owners, verdicts, strict=True):
        if passed and dims[index] is None:
            dims[index] = dim
    return dims


def _along(weights: Tensor, dim: int, ndim: int) -> Tensor:
    """``weights [P, B]`` shaped to broadcast along ``dim`` of a ``[P, T, *y.shape]`` tensor
    (``ndim`` is the rank of ``[T, *y.shape]``)."""
    shape = [1] * (ndim + 1)
    shape[0], shape[2 + dim] = weights.shape
    return weights.view(shape)
