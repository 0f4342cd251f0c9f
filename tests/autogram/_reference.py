"""Ground truth for the engine tests: Gramians of Jacobians from ``torch.func.jacrev``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from jdoptim.autogram import Engine
from jdoptim.linalg import reshape_gramian

Forward = Callable[[Callable[..., object]], Tensor]


def reference_gramian(
    model: nn.Module, forward: Forward, params: Iterable[Tensor] | None = None
) -> Tensor:
    """``J Jᵀ`` reshaped as a generalized Gramian; ``forward(call)`` runs the model through ``call``.

    ``J`` is the Jacobian of ``forward``'s output w.r.t. ``params`` (default: every parameter that
    requires grad), computed by ``jacrev`` on a functional copy of the model.
    """
    wanted = {id(p) for p in params} if params is not None else None
    named = {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and (wanted is None or id(p) in wanted)
    }
    buffers = dict(model.named_buffers())

    def run(values: dict[str, Tensor]) -> Tensor:
        def call(*args: object, **kwargs: object) -> object:
            return functional_call(model, {**buffers, **values}, args, kwargs)

        return forward(call)

    with torch.random.fork_rng():
        shape = tuple(run({n: p.detach() for n, p in named.items()}).shape)
    with warnings.catch_warnings():
        # jacrev vmaps the backward pass; for attention, torch has no batching rule for the CPU
        # kernel's backward and warns that it loops instead (same values, slower): expected here.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        jacobians = jacrev(run)({n: p.detach() for n, p in named.items()})
    rows = math.prod(shape)
    matrix = torch.cat([j.reshape(rows, -1) for j in jacobians.values()], dim=1)
    return reshape_gramian(matrix @ matrix.T, shape)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual - expected).norm() / scale)


def engine_gramian_and_grads(
    engine: Engine, model: nn.Module, forward: Forward, weights_seed: int = 0
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The engine's Gramian, the fused ``.grad`` and autograd's ``output.backward(weights)``."""
    model.zero_grad(set_to_none=True)
    output = forward(model)
    gramian = engine.compute_gramian(output)
    generator = torch.Generator().manual_seed(weights_seed)
    weights = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    engine.backward(weights)
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    output.backward(weights)
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gramian, fused, expected


def loop_gramian(output: Tensor, params: list[Tensor]) -> Tensor:
    """``J Jᵀ`` from one ``autograd.grad`` per entry of ``output`` (same graph, same randomness)."""
    flat = output.reshape(-1)
    rows = []
    for index in range(flat.numel()):
        grads = torch.autograd.grad(flat[index], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    matrix = torch.stack(rows)
    return reshape_gramian(matrix @ matrix.T, tuple(output.shape))


def routes(engine: Engine, model: nn.Module) -> dict[str, str]:
    """How the engine computed each named parameter's part of its last Gramian."""
    return {
        name: engine._last_routes[id(p)]
        for name, p in model.named_parameters()
        if id(p) in engine._last_routes
    }
