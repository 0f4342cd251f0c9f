"""The two abstractions of the aggregation layer and their combinations.

* A :class:`Weighting` maps a statistic of the Jacobian ``J ∈ R^{m×n}`` (its Gramian ``G = J Jᵀ`` by
  default, or a matrix such as ``J`` itself or ``J₁ J₂ᵀ``) to a weight vector ``w ∈ R^m``.
* An :class:`Aggregator` maps ``J`` to one update direction ``d ∈ R^n``.

Most methods are ``d = wᵀ J`` with ``w`` depending on ``G`` only (:class:`GramianWeightedAggregator`),
which is what lets the autogram engine run them without ever forming ``J``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from jdoptim._named import Named as _Named
from jdoptim._stateful import Stateful
from jdoptim.linalg import (
    check_finite,
    check_generalized_gramian,
    check_gramian,
    check_matrix,
    check_square,
    flatten_generalized_gramian,
    gramian_from_jacobian,
    power_of_two_scale,
)

InputKind = Literal["gramian", "matrix", "cross_gramian"]

# Jacobian entries beyond these powers of two are rescaled (exactly) before forming J Jᵀ, so that
# float32 Gramians of huge or tiny Jacobians neither overflow nor lose digits to underflow.
_SAFE_LOG2_RANGE = 30


class Weighting(_Named, ABC):
    """Extracts a weight vector ``w ∈ R^m`` from an ``[m, m]`` Gramian or an ``[m, k]`` matrix.

    Calling a weighting validates the input (shape, symmetry for Gramians, finiteness), runs
    :meth:`forward` with any registered module hooks, and checks that the weights are finite.
    """

    #: ``"gramian"``: the input is ``G = J Jᵀ`` (square, symmetric, PSD). ``"matrix"``: any 2-D matrix
    #: with one row per objective (such as ``J`` itself). ``"cross_gramian"``: the square, generally
    #: non-symmetric ``A = J₁ J₂ᵀ`` of two Jacobians from independent batches (SDMGrad, MoDo).
    input_kind: ClassVar[InputKind] = "gramian"
    #: ``False`` when the weights depend only on ``m`` (Mean, Sum, ...): callers may pass a
    #: placeholder of the right shape instead of computing the input.
    requires_values: ClassVar[bool] = True
    #: ``True`` when multiplying the input by a positive scalar leaves the weights unchanged.
    scale_invariant: ClassVar[bool] = False
    #: ``True`` when autograd through the weights gives their true derivative. Otherwise (solvers,
    #: state, numpy) the weights are computed under ``torch.no_grad()`` and never require grad,
    #: rather than carrying a graph that treats them as constants.
    differentiable: ClassVar[bool] = False

    def __call__(self, matrix: Tensor, /) -> Tensor:
        if not self.requires_values:
            # Weights of m alone (Mean, Sum...): a Gramian or any [m, k] matrix, J itself too.
            check_matrix(matrix)
        elif self.input_kind == "gramian":
            check_gramian(matrix)
        elif self.input_kind == "cross_gramian":
            check_square(matrix)
        else:
            check_matrix(matrix)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            weights: Tensor = super().__call__(matrix)
        if weights.shape != (matrix.shape[0],):
            raise RuntimeError(
                f"{self!r} returned weights of shape {tuple(weights.shape)} for an input with "
                f"{matrix.shape[0]} rows; expected [{matrix.shape[0]}]."
            )
        if not bool(torch.isfinite(weights).all()):
            check_finite(weights, f"The weights computed by {self!r}")
        return weights

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """Returns the weights ``[m]`` for a validated input with ``m`` rows."""


class GeneralizedWeighting(_Named, ABC):
    """Extracts weights ``[m1, ..., mk]`` from a generalized Gramian ``[m1, ..., mk, mk, ..., m1]``.

    A generalized Gramian is what the autogram engine returns for a non-vector output (for instance
    ``[B, T]`` losses, one per instance and task).
    """

    def __call__(self, gramian: Tensor, /) -> Tensor:
        check_generalized_gramian(gramian)
        weights: Tensor = super().__call__(gramian)
        expected = tuple(gramian.shape[: gramian.ndim // 2])
        if tuple(weights.shape) != expected:
            raise RuntimeError(
                f"{self!r} returned weights of shape {tuple(weights.shape)}; expected {expected}."
            )
        return weights

    @abstractmethod
    def forward(self, gramian: Tensor, /) -> Tensor:
        """Returns the weights for a validated generalized Gramian."""


class Flattening(GeneralizedWeighting):
    """Applies a Gramian weighting to the flattened generalized Gramian, then restores the shape.

    For ``[B, T]`` losses this treats all ``B·T`` losses as objectives of one Jacobian descent step.
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting) or weighting.input_kind != "gramian":
            raise TypeError(
                f"Flattening needs a Weighting of Gramians (such as UPGradWeighting()), got "
                f"{weighting!r}."
            )
        self.weighting = weighting

    def forward(self, gramian: Tensor, /) -> Tensor:
        shape = tuple(gramian.shape[: gramian.ndim // 2])
        return self.weighting(flatten_generalized_gramian(gramian)).reshape(shape)

    def _repr_args(self) -> str:
        return repr(self.weighting)

    def __str__(self) -> str:
        return f"Flattening({self.weighting})"


class Aggregator(_Named, ABC):
    """Maps a Jacobian ``[m, n]`` (one row per objective) to one update direction ``[n]``."""

    #: ``True`` when autograd through the direction gives its true derivative w.r.t. ``J``.
    #: Otherwise the aggregation runs under ``torch.no_grad()`` and its result never requires grad.
    #: A :class:`WeightedAggregator` is differentiable when its weighting is.
    differentiable: bool = False
    #: ``True`` when coordinate ``j`` of the direction depends on column ``j`` of ``J`` only
    #: (:class:`TrimmedMean`): the aggregation of any set of columns is that part of the whole
    #: direction, so it can run on the shards of a sharded model (``jdoptim.distributed``).
    coordinate_wise: ClassVar[bool] = False

    def __call__(self, matrix: Tensor, /) -> Tensor:
        check_matrix(matrix, "The Jacobian matrix")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            result: Tensor = super().__call__(matrix)
        if result.shape != (matrix.shape[1],):
            raise RuntimeError(
                f"{self!r} returned a vector of shape {tuple(result.shape)} for a Jacobian of shape "
                f"{tuple(matrix.shape)}; expected [{matrix.shape[1]}]."
            )
        return result

    @abstractmethod
    def forward(self, matrix: Tensor, /) -> Tensor:
        """Returns the aggregation ``[n]`` of a validated Jacobian ``[m, n]``."""

    def __str__(self) -> str:
        return type(self).__name__


class WeightedAggregator(Aggregator):
    """``d = wᵀ J`` where ``w = weighting(J)`` for a weighting of matrices."""

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a Weighting, got {type(weighting).__name__}.")
        self._check_weighting(weighting)
        self.weighting = weighting
        self.differentiable = weighting.differentiable

    def __getattr__(self, name: str) -> Any:
        weighting = self.__dict__.get("_modules", {}).get("weighting")
        if weighting is not None and name in type(weighting).hyper_parameters:
            return getattr(weighting, name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        # The weighting's hyper-parameters live on the weighting: writing them here must reach it.
        weighting = self.__dict__.get("_modules", {}).get("weighting")
        if (
            weighting is not None
            and name in type(weighting).hyper_parameters
            and name not in type(self).hyper_parameters
        ):
            setattr(weighting, name, value)
            return
        super().__setattr__(name, value)

    def reset(self) -> None:
        """Forgets what a stateful weighting learnt from previous calls (nothing otherwise)."""
        if isinstance(self.weighting, Stateful):
            self.weighting.reset()

    def _check_weighting(self, weighting: Weighting) -> None:
        if weighting.input_kind != "matrix" and weighting.requires_values:
            raise TypeError(
                f"{weighting!r} takes a Gramian; wrap it in GramianWeightedAggregator instead."
            )

    def compute_weights(self, matrix: Tensor, /) -> Tensor:
        """The weights ``w`` this aggregator combines the rows of ``matrix`` with."""
        return self.weighting(matrix)

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.compute_weights(matrix) @ matrix

    def _repr_args(self) -> str:
        return self.weighting._repr_args()


class GramianWeightedAggregator(WeightedAggregator):
    """``d = wᵀ J`` where ``w = weighting(J Jᵀ)``: the weights only depend on the Gramian.

    Every aggregator of this kind can run on the autogram engine, which computes ``J Jᵀ`` without
    forming ``J``: use its :attr:`weighting` there.
    """

    def _check_weighting(self, weighting: Weighting) -> None:
        if weighting.input_kind != "gramian":
            raise TypeError(
                f"{weighting!r} does not take a Gramian; wrap it in WeightedAggregator instead."
            )

    def compute_weights(self, matrix: Tensor, /) -> Tensor:
        return self.compute_weights_from_blocks([matrix])

    def compute_weights_from_blocks(self, blocks: Sequence[Tensor], /) -> Tensor:
        """The weights for ``J = [J₁ ⋯ J_k]`` given as its column blocks ``J_p`` of shape ``[m, n_p]``.

        ``J Jᵀ = Σ_p J_p J_pᵀ``, so ``J`` is never concatenated: autojac's ``jac_to_grad`` passes
        one block per parameter and its memory stays at one Jacobian.
        """
        weighting = self.weighting
        rows = blocks[0].shape[0]
        if not weighting.requires_values:
            return weighting(blocks[0].new_zeros(()).expand(rows, rows))
        dtype = blocks[0].dtype
        if dtype in (torch.float16, torch.bfloat16):
            # A half-precision J Jᵀ overflows from entries of a few hundred (float16's largest is
            # 65504) and is not positive semi-definite to its own precision: form it in float32.
            return self.compute_weights_from_blocks([block.float() for block in blocks]).to(dtype)
        scale = _extreme_entries_scale(blocks)
        if scale is not None and not weighting.scale_invariant:
            # Weights that depend on the scale need the true Gramian: float64 holds it where the
            # blocks' own dtype would overflow or underflow.
            weights = self._weights_of_blocks([block.to(torch.float64) for block in blocks], None)
            return weights.to(dtype)
        return self._weights_of_blocks(blocks, scale)

    def _weights_of_blocks(self, blocks: Sequence[Tensor], scale: Tensor | None) -> Tensor:
        weighting = self.weighting
        rows = blocks[0].shape[0]
        if len(blocks) == 1:
            matrix = blocks[0] if scale is None else blocks[0] / scale
            return weighting(gramian_from_jacobian(matrix))
        gramian = blocks[0].new_zeros(rows, rows)
        for block in blocks:
            scaled = block if scale is None else block / scale
            gramian.addmm_(scaled, scaled.T)
        return weighting((gramian + gramian.T) / 2)


def _extreme_entries_scale(blocks: Sequence[Tensor]) -> Tensor | None:
    """A power of two to divide the blocks by when their largest entry is too large or too small.

    Taken over all blocks together, so that the blocks' Gramians stay summable.
    """
    extremes = [torch.stack(torch.aminmax(block)) for block in blocks if block.numel() > 0]
    if not extremes:
        return None
    scale = power_of_two_scale(torch.cat(extremes))
    return scale if bool(scale.log2().abs() > _SAFE_LOG2_RANGE) else None
