"""A layer's closed form holds only for its class's own computation on its own parameters.

Each case below gave a silently wrong Gramian: the engine matched the layer's class and trusted it,
while the call used derived weights (``torch.func.functional_call``: LoRA, fast weights), another
computation (an overridden ``_conv_forward``, a ``forward`` patched on the instance), or a hook
changed the output before the engine saw it; the replay route ran the user's hooks again.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from jdoptim.autogram import Engine
from tests.autogram._reference import loop_gramian, relative_error

DOUBLE = torch.float64


def assert_exact_gramian(model: nn.Module, forward: Any) -> None:
    engine = Engine(model, batch_dim=0)
    params = [p for p in model.parameters() if p.requires_grad]
    forward()  # a first call, so that the engine knows (and caches) every layer
    output = forward()
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(forward(), params)) <= 1e-10


def test_functional_call_with_a_weight_derived_from_other_parameters() -> None:
    """LoRA by functional_call: the layer's trainable bias is its own, its weight W0 + B A."""
    torch.manual_seed(0)

    class LoRA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(4, 3)
            self.base.weight.requires_grad_(False)
            self.a = nn.Parameter(torch.randn(2, 4))
            self.b = nn.Parameter(torch.randn(3, 2))

        def forward(self, x: Tensor) -> Tensor:
            weight = self.base.weight + self.b @ self.a
            return functional_call(self.base, {"weight": weight, "bias": self.base.bias}, (x,))

    model = LoRA().to(DOUBLE)
    x = torch.randn(6, 4, dtype=DOUBLE)
    assert_exact_gramian(model, lambda: model(x).pow(2).sum(dim=1))


def test_fast_weights_after_a_call_with_the_real_parameters() -> None:
    """MAML-style: one plain call (validation, say) cached the closed form; later calls through
    functional_call with adapted weights reused it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(DOUBLE)
    x = torch.randn(6, 4, dtype=DOUBLE)
    with torch.no_grad():
        model(x)

    def forward() -> Tensor:
        params = dict(model.named_parameters())
        inner = model(x).pow(2).sum()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads, strict=True)}
        return functional_call(model, adapted, (x,)).squeeze(-1).pow(2)

    assert_exact_gramian(model, forward)


def test_a_convolution_whose_conv_forward_is_overridden() -> None:
    class StandardisedConv(nn.Conv2d):
        def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            mean = weight.mean(dim=(1, 2, 3), keepdim=True)
            return super()._conv_forward(input, weight - mean, bias)

    torch.manual_seed(0)
    model = nn.Sequential(StandardisedConv(2, 3, 3), nn.Flatten()).to(DOUBLE)
    x = torch.randn(5, 2, 5, 5, dtype=DOUBLE)
    assert_exact_gramian(model, lambda: model(x).pow(2).sum(dim=1))


def test_a_forward_patched_on_the_instance() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DOUBLE)
    stock = layer.forward
    layer.forward = functools.partial(lambda x, f: f(x) * 2 + 1, f=stock)  # type: ignore[method-assign]
    x = torch.randn(6, 4, dtype=DOUBLE)
    assert_exact_gramian(layer, lambda: layer(x).pow(2).sum(dim=1))


def test_a_user_hook_run_before_the_engines() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DOUBLE)
    x = torch.randn(6, 4, dtype=DOUBLE)
    engine = Engine(model, batch_dim=0)
    model(x)  # the engine's hooks are attached
    model[0].register_forward_hook(lambda module, args, out: out * 2 + 1, prepend=True)
    params = list(model.parameters())
    gramian = engine.compute_gramian(model(x).pow(2).sum(dim=1))
    assert relative_error(gramian, loop_gramian(model(x).pow(2).sum(dim=1), params)) <= 1e-10


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(3, 8)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        out, _ = self.cross(self.query(x), memory, memory, need_weights=False)
        return out.pow(2).sum(dim=(1, 2))


def test_the_replay_route_does_not_run_the_users_hooks_again() -> None:
    """Cross-attention is replayed per instance; replaying through module.__call__ ran an output
    hook again (a wrong Gramian) and a logging hook that reads .item() (an error under vmap)."""
    torch.manual_seed(0)
    model = CrossAttention().to(DOUBLE)
    logged: list[float] = []
    model.cross.register_forward_hook(lambda module, args, out: (out[0] * 2 + 1, out[1]))
    model.cross.register_forward_pre_hook(lambda module, args: (args[0] * 3, *args[1:]))
    model.cross.register_forward_hook(lambda module, args, out: logged.append(out[0].sum().item()))
    x, memory = torch.randn(3, 4, 3, dtype=DOUBLE), torch.randn(3, 5, 8, dtype=DOUBLE)
    calls = len(logged)
    assert_exact_gramian(model, lambda: model(x, memory))
    assert len(logged) == calls + 3  # once per forward, none from the replay


def test_a_layer_with_an_empty_weight() -> None:
    """nn.Linear(0, d) (a configurable model with no extra features): the closed form reshaped
    its zero-element factors and raised, where autograd gives an empty gradient."""

    class WithExtras(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(3, 5)
            self.extras = nn.Linear(0, 5, bias=False)
            self.head = nn.Linear(5, 1)

        def forward(self, x: Tensor, extras: Tensor) -> Tensor:
            hidden = torch.tanh(self.main(x) + self.extras(extras))
            return self.head(hidden).squeeze(-1).pow(2)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about initialising a zero-element tensor
        model = WithExtras().to(DOUBLE)
    x, extras = torch.randn(4, 3, dtype=DOUBLE), torch.randn(4, 0, dtype=DOUBLE)
    assert_exact_gramian(model, lambda: model(x, extras))
    engine = Engine(model, batch_dim=0)
    model(x, extras)
    engine.compute_gramian(model(x, extras))
    engine.backward(torch.ones(4, dtype=DOUBLE))
    assert model.extras.weight.grad is not None and model.extras.weight.grad.shape == (5, 0)


def test_a_global_forward_hook_that_changes_outputs() -> None:
    """torch runs global forward hooks before a module's own: one that rescales a Linear's output
    changed what the engine's hook saw, and the closed form took it for the layer's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(DOUBLE)
    x = torch.randn(6, 4, dtype=DOUBLE)

    def rescale(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        return output * 3 + 1 if isinstance(module, nn.Linear) else None

    handle = nn.modules.module.register_module_forward_hook(rescale)
    try:
        assert_exact_gramian(model, lambda: model(x).squeeze(-1).pow(2))
    finally:
        handle.remove()
