"""Checks every stateful method must pass: checkpoint into a fresh instance, reset, dtype moves."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from jdoptim import Stateful

Call = Callable[[nn.Module, Tensor], Tensor]


def _call(method: nn.Module, matrix: Tensor, index: int) -> Tensor:
    torch.manual_seed(1000 + index)  # the same draws for methods that shuffle (GradVac)
    result: Tensor = method(matrix)
    return result


def run(method: nn.Module, inputs: Sequence[Tensor], start: int = 0) -> list[Tensor]:
    return [_call(method, matrix, start + k) for k, matrix in enumerate(inputs)]


def assert_resumes_identically(
    make: Callable[[], nn.Module], inputs: Sequence[Tensor], split: int
) -> None:
    """A checkpoint taken after ``split`` calls, loaded into a fresh instance, continues bit-exactly."""
    expected = run(make(), inputs)
    first = make()
    run(first, inputs[:split])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    resumed = run(fresh, inputs[split:], start=split)
    for got, want in zip(resumed, expected[split:], strict=True):
        assert torch.equal(got, want)
    # the checkpoint is a copy: the original continues identically too
    for got, want in zip(run(first, inputs[split:], start=split), expected[split:], strict=True):
        assert torch.equal(got, want)


def assert_reset_restarts(make: Callable[[], nn.Module], inputs: Sequence[Tensor]) -> None:
    """After ``reset()``, the method behaves like a new one, and its first outputs differ later."""
    method = make()
    first_run = run(method, inputs)
    method.reset()  # type: ignore[operator]
    assert not any(part._state for part in _stateful_parts(method))
    assert all(torch.equal(a, b) for a, b in zip(run(method, inputs), first_run, strict=True))


def assert_state_follows_dtype(make: Callable[[], nn.Module], inputs: Sequence[Tensor]) -> None:
    """``.to(dtype)`` converts every floating state tensor; the method then runs in that dtype."""
    method = make()
    run(method, [x.double() for x in inputs[:2]])
    method.to(torch.float32)
    tensors = [
        v for part in _stateful_parts(method) for v in part._state.values() if isinstance(v, Tensor)
    ]
    assert tensors
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    result = run(method, [x.float() for x in inputs[2:3]])[0]
    assert result.dtype == torch.float32 and torch.isfinite(result).all()


def _stateful_parts(method: nn.Module) -> list[Stateful]:
    """The method itself if stateful, and the stateful modules inside it (an aggregator's weighting)."""
    return [part for part in method.modules() if isinstance(part, Stateful)]
