"""Weights from a (generalized) Gramian, whatever kind of weighting the user gave."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from jdoptim._stateful import Stateful
from jdoptim._warnings import warn
from jdoptim.aggregation import Flattening, GeneralizedWeighting, StateSizeError, Weighting
from jdoptim.linalg import check_finite
from jdoptim.paths._base import NonFiniteGramianError
from jdoptim.paths._method import needs_gramian


def weights_for(
    weighting: Weighting | GeneralizedWeighting, gramian: Tensor, *, instances: bool = False
) -> Tensor:
    """The weights for ``gramian``; a plain weighting is flattened for losses with ndim > 1.

    With ``instances`` (the losses are per instance), a stateful weighting whose state was learnt
    for another number of losses (a smaller last batch) restarts its state, with a warning:
    per-instance state cannot follow a batch of another size. And a weighting whose state is only a
    warm start (UPGrad's and DualProj's last projections) starts cold: each step's instances are
    other objectives, so the last step's solutions would only mislead its solver (UPGrad on the
    Gramian of an MLP's 128 per-instance losses, a new batch each call: 12.8 ms from the last
    batch's solutions, 5.9 ms cold; benchmarks/bench_dual_cone.py --kinds mlp).
    """
    if instances:
        _start_cold(weighting)
    try:
        return _weights_or_restart(weighting, gramian, instances)
    except ValueError:
        # Every weighting validates its input (one host read), a non-finite Gramian included:
        # only a rejected one is examined again, to tell an overflow (NonFiniteGramianError, which
        # a loss scaler skips) from a Gramian the weighting cannot take.
        check_gramian_finite(gramian)
        raise


def _weights_or_restart(
    weighting: Weighting | GeneralizedWeighting, gramian: Tensor, instances: bool
) -> Tensor:
    losses = math.prod(gramian.shape[: gramian.ndim // 2])
    return restarting_on_size_change(
        weighting, lambda: _weights(weighting, gramian), losses, instances
    )


def restarting_on_size_change(
    method: nn.Module, call: Callable[[], Tensor], losses: int, instances: bool
) -> Tensor:
    """``call()``; if ``method`` kept per-instance state for another number of losses than this
    step's ``losses`` (a smaller last batch), it starts afresh, with a warning, and is called again.
    Per-task state (``instances`` false) keeps raising: a change of tasks is the user's to make."""
    try:
        return call()
    except StateSizeError:
        if not instances or not isinstance(method, Stateful):
            raise
        warn(
            f"{method!r} kept state for another number of losses than the {losses} of this "
            "step. They are per instance (batch_dim is set), and per-instance state cannot carry "
            "over to a batch of another size (such as a smaller last batch): it starts afresh."
        )
        method.reset()
        return call()


def _start_cold(method: nn.Module) -> None:
    """Drops the state of every module of ``method`` whose state is only a warm start: the next
    call starts cold (for per-instance rows, which are other objectives at every step)."""
    for module in method.modules():
        if isinstance(module, Stateful) and getattr(module, "state_is_a_warm_start", False):
            module.reset()


def _weights(weighting: Weighting | GeneralizedWeighting, gramian: Tensor) -> Tensor:
    if isinstance(weighting, Weighting) and gramian.ndim != 2:
        return Flattening(weighting)(gramian)
    return weighting(gramian)


def wants_gramian(weighting: Weighting | GeneralizedWeighting) -> bool:
    """Whether a step must compute the Gramian: the weights depend on it, or a hook looks at it."""
    return needs_gramian(weighting) or _has_hooks(weighting)


def placeholder_gramian(losses: Tensor) -> Tensor:
    """A zero Gramian of the right shape, for weightings whose weights depend on the shape only."""
    return losses.new_zeros(()).expand(*losses.shape, *losses.shape[::-1])


def check_gramian_finite(gramian: Tensor, name: str = "The Gramian of the losses") -> None:
    try:
        check_finite(gramian, name)
    except ValueError as error:
        raise NonFiniteGramianError(str(error)) from None


def _has_hooks(module: nn.Module) -> bool:
    return any(bool(m._forward_hooks or m._forward_pre_hooks) for m in module.modules())


@contextmanager
def output_of(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collects what ``module`` returns while the context is active (the weights of an aggregator)."""
    seen: list[Tensor] = []

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            seen.append(output.detach())

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
