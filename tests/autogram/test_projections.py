"""Linear projections inside calls without a closed form take their gradients from the one backward
pass (no replay, no per-instance passes) where the structure proves them, and nowhere else.

Ground truth: per-loss ``autograd.grad`` on the same graph, and the fused ``.grad`` against
``losses.backward(weights)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, _batched
from jdoptim.autogram._terms import BiasTerm
from tests.autogram._reference import engine_gramian_and_grads, loop_gramian, relative_error

Projected = list[int]


@pytest.fixture
def projected(monkeypatch: pytest.MonkeyPatch) -> Iterator[Projected]:
    """Per Gramian pass, how many generic calls took their terms from projections."""
    seen: Projected = []
    original = _batched.BatchedPass.terms

    def recording(self: _batched.BatchedPass) -> list[tuple[Tensor, object]]:
        result = original(self)
        seen.append(len(self.projected))
        return result  # type: ignore[return-value]

    monkeypatch.setattr(_batched.BatchedPass, "terms", recording)
    yield seen


def _check(model: nn.Module, losses: Callable[[], Tensor], batch_dim: int = 0) -> Engine:
    """The Gramian against per-loss autograd, the fused ``.grad`` of every parameter against
    ``losses.backward(weights)``; ``losses()`` runs the same forward pass each time."""
    engine = Engine(model, batch_dim=batch_dim)
    gramian, fused, expected = engine_gramian_and_grads(engine, model, lambda _: losses())
    params = [p for p in model.parameters() if p.requires_grad]
    assert relative_error(gramian, loop_gramian(losses(), params)) <= 1e-10
    assert (
        fused.keys()
        == expected.keys()
        == {n for n, p in model.named_parameters() if p.requires_grad}
    )
    for name, grad in expected.items():
        assert relative_error(fused[name], grad) <= 1e-10
    return engine


ATTENTION_CALLS: dict[str, dict[str, object]] = {
    "plain": {},
    "no_bias": {"bias": False},
    "sequence_first": {"batch_first": False},
    "padding_mask": {"key_padding_mask": True},
    "causal_mask": {"attn_mask": True},
    "dropout_in_training": {"dropout": 0.3},
    "with_weights": {"need_weights": True},
}


@pytest.mark.parametrize("name", list(ATTENTION_CALLS))
def test_self_attention_is_projected(name: str, projected: Projected) -> None:
    options = ATTENTION_CALLS[name]
    torch.manual_seed(0)
    batch_first = bool(options.get("batch_first", True))
    layer = nn.MultiheadAttention(
        8,
        2,
        bias=bool(options.get("bias", True)),
        batch_first=batch_first,
        dropout=float(options.get("dropout", 0.0)),  # type: ignore[arg-type]
    ).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)  # [B, L, E]
    if not batch_first:
        x = x.transpose(0, 1)
    kwargs: dict[str, object] = {"need_weights": bool(options.get("need_weights", False))}
    if options.get("key_padding_mask"):
        padding = torch.zeros(4, 5, dtype=torch.bool)
        padding[1, 3:] = True
        kwargs["key_padding_mask"] = padding
    if options.get("attn_mask"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=x.dtype)

    def losses() -> Tensor:
        torch.manual_seed(1)  # the same dropout masks in every forward pass
        out, weights = layer(x, x, x, **kwargs)
        total = out.pow(2).sum(dim=(1, 2) if batch_first else (0, 2))
        if weights is not None:
            total = total + weights.pow(2).sum(dim=(1, 2))
        return total  # type: ignore[no-any-return]

    _check(layer, losses)
    assert projected[0] == 1


class _Projected(nn.Module):
    """A custom layer with weights used as ``F.linear`` on 3-d inputs, and a shared gate."""

    def __init__(self, mix: str = "") -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(6, 4))
        self.up_bias = nn.Parameter(torch.randn(6))
        self.down = nn.Parameter(torch.randn(3, 6))
        self.mix = mix

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.up, self.up_bias))  # [B, S, 6]
        if self.mix == "across_instances":
            h = h + h.flip(0)
        if self.mix == "weight_twice":
            h = h + F.linear(h, self.up @ self.up.T)
        return F.linear(h, self.down)


@pytest.mark.parametrize("mix", ["", "across_instances", "weight_twice"])
def test_a_custom_layer_is_projected_unless_it_mixes_or_reuses(
    mix: str, projected: Projected
) -> None:
    torch.manual_seed(0)
    layer = _Projected(mix).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    _check(layer, lambda: layer(x).pow(2).sum(dim=(1, 2)))
    assert projected[0] == (1 if mix == "" else 0)


RECURRENT: dict[str, Callable[[], nn.Module]] = {
    "rnn": lambda: nn.RNN(3, 4, batch_first=True),
    "gru": lambda: nn.GRU(3, 4, batch_first=True),
    "lstm": lambda: nn.LSTM(3, 4, batch_first=True),
    "gru_two_layers_sequence_first": lambda: nn.GRU(3, 4, num_layers=2),
    "lstm_bidirectional": lambda: nn.LSTM(3, 4, batch_first=True, bidirectional=True),
    "gru_without_bias": lambda: nn.GRU(3, 4, bias=False, batch_first=True),
}


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_weights_used_at_every_step_are_projected(
    name: str, projected: Projected
) -> None:
    torch.manual_seed(0)
    model = RECURRENT[name]().double()
    batch_first = getattr(model, "batch_first", True)
    x = torch.randn(5, 7, 3, dtype=torch.float64)  # [B, S, features]
    x = x if batch_first else x.transpose(0, 1)

    def losses() -> Tensor:
        out, _ = model(x)
        return out.pow(2).sum(dim=(1, 2) if batch_first else (0, 2))  # type: ignore[no-any-return]

    _check(model, losses)
    assert projected == [1]


class _FlipSandwich(nn.Module):
    """Per-instance from outside, but its second projection sees the instances in reverse."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(6, 4))
        self.down = nn.Parameter(torch.randn(3, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.up)).flip(0)
        return F.linear(h, self.down).flip(0)


def test_projections_that_cannot_be_proven_leave_the_other_layers_proven(
    projected: Projected, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe(*args: object) -> None:
        raise AssertionError("the layer outputs are proven: no probe should run")

    monkeypatch.setattr(_batched, "scaled_dims", no_probe)
    torch.manual_seed(0)
    model = nn.Sequential(_FlipSandwich(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    engine = _check(model, lambda: model(x).pow(2).sum(dim=1))
    assert projected[0] == 0
    routes = {r.name: r.route for r in engine.route_report()}
    assert routes == {
        "0.up": "local",
        "0.down": "local",
        "1.weight": "closed_form",
        "1.bias": "closed_form",
    }


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_projections_with_several_losses_per_instance(batch_dim: int, projected: Projected) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(6, 2, batch_first=True).double()
    recurrent = nn.GRU(6, 3, batch_first=True).double()
    model = nn.ModuleList([attention, recurrent])
    x = torch.randn(4, 5, 6, dtype=torch.float64)

    def losses() -> Tensor:
        attended, _ = attention(x, x, x, need_weights=False)
        out, _ = recurrent(attended)
        per_task = torch.stack([out.pow(2).sum(dim=(1, 2)), out.sin().sum(dim=(1, 2))], dim=1)
        return per_task if batch_dim == 0 else per_task.T  # [B, 2] or [2, B]

    _check(model, losses, batch_dim)
    assert projected == [2]


class _TinyViT(nn.Module):
    """A class token expanded into the batch and a position table added to it: parameters of the
    top module, used around its children."""

    def __init__(self, offset: str = "") -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.offset = nn.Parameter(torch.randn(4 if offset == "per_instance" else 1, 1, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)
        self.kind = offset

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, 8]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1) + self.pos
        if self.kind == "twice":
            tokens = tokens * self.offset  # also scaling: a second use of a supported kind
        if self.kind == "through_a_function":
            tokens = tokens + torch.tanh(self.offset)  # not the parameter itself
        tokens = tokens + self.offset
        return self.head(self.encoder(tokens)[:, 0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("offset", ["", "twice", "per_instance", "through_a_function"])
def test_broadcast_parameters_are_projected_when_shared_and_used_directly(
    offset: str, projected: Projected
) -> None:
    torch.manual_seed(0)
    model = _TinyViT(offset).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    engine = _check(model, lambda: model(x).pow(2).sum(dim=1))
    routes = {r.name: r.route for r in engine.route_report()}
    taken = offset in ("", "twice")
    if taken:
        assert set(routes.values()) == {"closed_form"}
    else:  # one parameter of the call refused: the call's parameters take the local route
        assert {routes[name] for name in ("cls", "pos", "offset")} == {"local"}
    # One generic call, the model's own (its encoder's attention is inside it).
    assert projected == [1 if taken else 0]


class _ScaledBlock(nn.Module):
    """RMS norm, a linear map and a layer scale: parameters scaling activations."""

    def __init__(self, squared: bool = False) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(6)
        self.linear = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.squared = squared

    def forward(self, x: Tensor) -> Tensor:
        gamma = self.gamma * self.gamma if self.squared else self.gamma
        return x + self.linear(self.norm(x)) * gamma


@pytest.mark.parametrize("squared", [False, True])
def test_scaling_parameters_are_projected(squared: bool, projected: Projected) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledBlock(squared), _ScaledBlock()).double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    engine = _check(model, lambda: model(x).pow(2).sum(dim=(1, 2)))
    routes = {r.name: r.route for r in engine.route_report()}
    assert routes["1.norm.weight"] == routes["1.gamma"] == "closed_form"
    # gamma * gamma holds no instance: its uses cannot be placed, and only that block's call
    # takes the local route (the other one's projections still go through).
    assert routes["0.gamma"] == ("local" if squared else "closed_form")
    assert projected == [1 if squared else 2]  # the blocks' calls (each holding its norm's)


class _Affine(nn.Module):
    """A custom layer whose output is its product itself (the same edge as the call's output)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def test_a_product_that_is_the_call_output(projected: Projected) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Affine(), nn.Tanh(), _Affine()).double()
    model[2].weight = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(5, 4, dtype=torch.float64)
    _check(model, lambda: model(x).pow(2).sum(dim=1))
    assert projected == [2]


@pytest.mark.parametrize("name", ["rnn", "linear_model"])
def test_biases_share_their_weights_output_gradients(name: str) -> None:
    """A bias added in exactly its weight's products keeps the weight's factor ``a`` itself (one
    product for both Gramians), also when the products are many (a recurrent weight)."""
    torch.manual_seed(0)
    if name == "rnn":
        model: nn.Module = nn.RNN(3, 4, batch_first=True).double()
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 7, 3, dtype=torch.float64)
    engine = Engine(model, batch_dim=0)
    output = model(x)
    losses = (output[0] if isinstance(output, tuple) else output).pow(2).sum(dim=(1, 2))
    terms = dict((id(p), t) for p, t in engine.compute_terms(losses))
    named = dict(model.named_parameters())
    pairs = [(n, n.replace("bias", "weight")) for n in named if "bias" in n]
    assert pairs
    for bias, weight in pairs:
        assert isinstance(terms[id(named[bias])], BiasTerm)
        assert terms[id(named[bias])].a is terms[id(named[weight])].a  # type: ignore[attr-defined]
