"""From per-parameter terms to the Gramian of the losses and to ``.grad``.

Both run with autocast disabled and from factors of at least float32, so that a Gramian computed
inside an fp16 autocast region, or of losses scaled by a ``GradScaler``, does not overflow in
half-precision intermediates. When a factor's largest entry lies beyond ``2^±30`` (or a ``scale``
is asked for), each floating factor is divided by a power of two that brings its largest entry near
1 (exact in floating point) before the term's Gramian is formed, and the powers are put back at the
end: intermediates never underflow or overflow. In normal ranges the factors are used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from jdoptim._grad_layout import in_param_layout
from jdoptim.autogram._terms import Term, distinct_factors, term_gramians
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


# Jacobians whose largest entry (bound) lies within 2^±_SAFE_EXPONENT are not rescaled.
_SAFE_EXPONENT = 30


def jacobian_scale(terms: Sequence[Term]) -> Tensor:
    """A power of two ``s`` to divide the Jacobian by so that its Gramian stays in range.

    ``s`` is 1 unless the largest entry of the terms' per-row gradients (bounded by the product of
    each term's largest factor entries) lies beyond ``2^±30``; then it is that entry's power of
    two. A 0-d float64 tensor on the terms' device (no host synchronisation). Pass it to
    :func:`gramian_from_terms` as ``scale`` to get the Gramian of ``J / s``: the same weights for
    every scale-invariant weighting, and ``s²`` times it is the Gramian of ``J``.
    :func:`scaled_gramian_from_terms` does both from one pass over the factors.
    """
    if not terms:
        raise ValueError("jacobian_scale needs at least one term.")
    return _scale_of(_Exponents([_upcast(term) for term in terms]))


def _scale_of(exponents: _Exponents) -> Tensor:
    largest = exponents.per_term.amax()
    safe = largest.abs() <= _SAFE_EXPONENT
    return _exact_power_of_two(torch.where(safe, torch.zeros_like(largest), largest))


def gramian_from_terms(
    terms: Sequence[Term],
    shape: tuple[int, ...],
    batch_dim: int | None,
    dtype: torch.dtype | None = None,
    *,
    scale: Tensor | None = None,
) -> Tensor:
    """The generalized Gramian ``[*shape, *reversed(shape)]`` of losses of ``shape``.

    Sums the terms' Gramians (in ``dtype``; default: the terms' dtype, at least float32),
    symmetrises the sum, and moves its instance-major rows (instance along ``batch_dim``) to the
    losses' own layout. A 0-d ``shape`` gives a 0-d Gramian. With ``scale`` (a power of two, such
    as :func:`jacobian_scale`'s), the Gramian of ``J / scale``: in range where the Gramian of
    ``J`` itself would underflow or overflow.
    """
    if not terms:
        raise ValueError("gramian_from_terms needs at least one term.")
    return _assemble(terms, shape, batch_dim, dtype, scale=scale, scaled=False)[0]


def scaled_gramian_from_terms(
    terms: Sequence[Term],
    shape: tuple[int, ...],
    batch_dim: int | None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(G', s)``: ``s = jacobian_scale(terms)`` and ``G' = gramian_from_terms(..., scale=s)``.

    The same values as the two calls, from one pass over the terms' factors.
    """
    if not terms:
        raise ValueError("scaled_gramian_from_terms needs at least one term.")
    gramian, scale = _assemble(terms, shape, batch_dim, dtype, scale=None, scaled=True)
    assert scale is not None
    return gramian, scale


def _assemble(
    terms: Sequence[Term],
    shape: tuple[int, ...],
    batch_dim: int | None,
    dtype: torch.dtype | None,
    *,
    scale: Tensor | None,
    scaled: bool,
) -> tuple[Tensor, Tensor | None]:
    batch_dim = _normalized(batch_dim, shape)
    rows = math.prod(shape)
    with _full_precision(terms):
        terms = [_upcast(term) for term in terms]
        exponents = _Exponents(terms)
        if scaled:
            scale = _scale_of(exponents)
        shift = None if scale is None else torch.frexp(scale.detach().double()).exponent - 1
        per_term = exponents.per_term
        if shift is not None:
            per_term = per_term - shift.to(per_term.device)
        # One host synchronisation: in normal ranges the factors are used as they are.
        extreme = exponents.per_factor.abs() > _SAFE_EXPONENT
        rescale = bool(extreme.any() | (per_term != exponents.per_term).any())
        # Normalised terms keep their own powers of two: a bias is folded into its weight's
        # Gramian only when the factors are used as they are.
        used = exponents.normalized(terms) if rescale else terms
        gramians = [term.gramian() for term in used] if rescale else term_gramians(used)
        for term, gramian in zip(terms, gramians, strict=True):
            if gramian is not None and tuple(gramian.shape) != (rows, rows):
                raise ValueError(
                    f"A {type(term).__name__} has {gramian.shape[0]} rows, but losses of shape "
                    f"{shape} have {rows}: the terms do not belong to these losses."
                )
        present = [gramian for gramian in gramians if gramian is not None]
        if dtype is None:
            dtype = torch.promote_types(present[0].dtype, torch.float32)
        if rescale:
            # A term's Gramian is 2^(2e) times its normalised one: 2^e twice, each in float range.
            factors = _exact_power_of_two(per_term).to(dtype)
            present = [
                gramian.to(dtype) * factor * factor
                for gramian, factor in zip(present, factors.unbind(), strict=True)
            ]
        else:
            present = [gramian.to(dtype) for gramian in present]
    assert dtype is not None
    total = present[0]
    for gramian in present[1:]:
        total = total + gramian
    total = (total + total.T) / 2
    if not shape:
        return total.reshape(()), scale
    if _moves_rows(shape, batch_dim):
        order = instance_major_order(shape, batch_dim).to(total.device)
        natural = torch.empty_like(total)
        natural[order[:, None], order[None, :]] = total
        total = natural
    return reshape_gramian(total, shape), scale


def _moves_rows(shape: tuple[int, ...], batch_dim: int | None) -> bool:
    """Whether instance-major rows differ from the losses' flat order."""
    if batch_dim is None:
        return False
    return any(size > 1 for size in shape[:batch_dim])


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
    with _full_precision([term for _, term in pairs]):
        for param, term in pairs:
            grad = _upcast(term).weighted_grad(rows).to(param.dtype)
            if param.grad is None:
                param.grad = in_param_layout(grad, param)
            else:
                param.grad.add_(grad)


def _normalized(batch_dim: int | None, shape: tuple[int, ...]) -> int | None:
    if batch_dim is None:
        return None
    if not -len(shape) <= batch_dim < len(shape):
        raise ValueError(f"batch_dim={batch_dim} is out of range for losses of shape {shape}.")
    return batch_dim % len(shape)


@contextmanager
def _full_precision(terms: Sequence[Term]) -> Iterator[None]:
    """Autocast off on the terms' device (a caller's fp16 region must not reach the Gramian)."""
    device = next((t.device for term in terms for t, _ in term.factors()), torch.device("cpu"))
    with torch.autocast(device.type, enabled=False):
        yield


def _upcast(term: Term) -> Term:
    """The term with half-precision floating factors in float32."""
    factors = [tensor for tensor, _ in term.factors()]
    if not any(t.dtype in (torch.float16, torch.bfloat16) for t in factors):
        return term
    return term.with_factors(
        [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in factors]
    )


class _Exponents:
    """Per distinct floating factor of some terms, ``e`` with ``max |factor| = m 2^e``,
    ``m ∈ [0.5, 1)``: a tensor several terms share (a bias's output gradients and its weight's) is
    read once.

    ``per_term`` sums each term's factor exponents: the exponent of a bound on its per-row
    gradient entries. A few operations per factor, no host synchronisation.
    """

    def __init__(self, terms: Sequence[Term]) -> None:
        tensors, _, slots = distinct_factors(terms)
        places: list[int | None] = []  # each distinct tensor's place among the floating ones
        floats: list[Tensor] = []
        for tensor in tensors:
            floating = tensor.is_floating_point() and tensor.numel() > 0
            places.append(len(floats) if floating else None)
            if floating:
                floats.append(tensor)
        occurrence = iter(slots)
        self.owners = [[places[next(occurrence)] for _ in term.factors()] for term in terms]
        device = next((t.device for t in floats), torch.device("cpu"))
        if floats:
            # max |f| as max(max f, -min f): no |f| temporary (and far faster on the CPU
            # than an infinity norm); two reductions per factor, the rest on the stacked values
            with torch.no_grad():
                # (torch.stack promotes mixed dtypes; float64 holds every float32 exactly)
                highest = torch.stack([f.amax() for f in floats]).double()
                lowest = torch.stack([f.amin() for f in floats]).double()
            largest = torch.maximum(highest, lowest.neg())
            self.per_factor = torch.frexp(largest).exponent.to(torch.int64)
        else:
            self.per_factor = torch.zeros(0, dtype=torch.int64, device=device)
        term_of = [i for i, owned in enumerate(self.owners) for place in owned if place is not None]
        factor_of = [place for owned in self.owners for place in owned if place is not None]
        per_use = self.per_factor
        if len(factor_of) > len(floats):  # some factor serves several terms
            per_use = per_use[torch.tensor(factor_of).to(device, non_blocking=True)]
        owner = torch.tensor(term_of, dtype=torch.int64).to(device, non_blocking=True)
        self.per_term = self.per_factor.new_zeros(len(terms)).index_add_(0, owner, per_use)

    def normalized(self, terms: Sequence[Term]) -> list[Term]:
        """The terms with each floating factor divided by ``2^e`` (exact)."""
        if not self.per_factor.numel():
            return list(terms)
        # 2^-e in two halves: a float32 factor's e reaches -148 (subnormals) and 2^148 is no
        # float32, but each half (at most 2^75) is, and each product stays exact.
        half = -self.per_factor // 2
        halves = (_exact_power_of_two(half), _exact_power_of_two(-self.per_factor - half))
        by_dtype: dict[torch.dtype, list[tuple[Tensor, Tensor]]] = {}
        result = []
        for term, positions in zip(terms, self.owners, strict=True):
            tensors = []
            for (tensor, _), position in zip(term.factors(), positions, strict=True):
                if position is None:
                    tensors.append(tensor)
                    continue
                if tensor.dtype not in by_dtype:
                    first, second = (power.to(tensor.dtype).unbind() for power in halves)
                    by_dtype[tensor.dtype] = list(zip(first, second, strict=True))
                first_half, second_half = by_dtype[tensor.dtype][position]
                tensors.append(tensor * first_half * second_half)
            result.append(term.with_factors(tensors))
        return result


def _exact_power_of_two(exponent: Tensor) -> Tensor:
    """``2^exponent`` as a float64 0-d tensor, built from its bits (exact; clamped to float64's
    normal range, far beyond float32's)."""
    biased = (exponent.to(torch.int64) + 1023).clamp(1, 2046)
    return (biased << 52).view(torch.float64)
