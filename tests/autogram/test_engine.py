"""The engine's Gramians and fused gradients equal the ground truth on many architectures.

Ground truth: ``J Jᵀ`` with ``J`` from ``torch.func.jacrev`` (or, for random layers, one
``autograd.grad`` per output entry on the same graph); fused gradients against
``output.backward(weights)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from tests.autogram._reference import (
    engine_gramian_and_grads,
    loop_gramian,
    reference_gramian,
    relative_error,
    routes,
)

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_exact(
    model: nn.Module,
    forward: Callable[[Callable[..., object]], Tensor],
    batch_dim: int | None,
    dtype: torch.dtype = torch.float64,
) -> Engine:
    model = model.to(dtype)
    engine = Engine(model, batch_dim=batch_dim)
    gramian, fused, expected = engine_gramian_and_grads(engine, model, forward)
    reference = reference_gramian(model, forward)
    assert gramian.shape == reference.shape
    assert relative_error(gramian, reference) <= TOLERANCE[dtype]
    assert fused.keys() == expected.keys()
    # Relative to the whole gradient: some parameters have a gradient that is zero up to rounding.
    scale = torch.cat([g.reshape(-1) for g in expected.values()]).norm()
    for name in expected:
        error = (fused[name] - expected[name]).norm() / scale
        assert error <= 1e2 * TOLERANCE[dtype], name
    return engine


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, stride=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        h = h + self.conv2(self.norm(h))
        h = nn.functional.max_pool2d(h, 2)
        return self.head(h.flatten(1))


class Shared(nn.Module):
    """One Linear called three times (weight sharing), with a residual path."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.layer(x))
        h = torch.tanh(self.layer(h)) + x
        return self.out(self.layer(h))


class DirectAndChildren(nn.Module):
    """Direct parameters used before, between and after a child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.child = nn.Linear(5, 4)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.child(x * self.scale)) + self.shift


class PyTreeBlock(nn.Module):
    """Takes a tuple and keyword arguments, returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.randn(3))

    def forward(self, pair: tuple[Tensor, Tensor], *, bias: Tensor) -> dict[str, Tensor]:
        left, right = pair
        return {"sum": self.a(left) * self.gain + self.b(right) + bias, "left": left}


class PyTreeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = PyTreeBlock()
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block((x, x.flip(1)), bias=torch.ones(3, dtype=x.dtype))
        return self.head(out["sum"]).squeeze(1) + out["left"].sum(1)


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp(batch_dim: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=dtype)
    engine = assert_exact(mlp(), lambda m: m(x).pow(2).sum(dim=1), batch_dim, dtype)
    if batch_dim is not None:
        assert set(engine._last_routes.values()) == {"closed_form"}


@pytest.mark.parametrize("batch_dim", [0, None])
def test_cnn_with_residual_pooling_and_group_norm(batch_dim: int | None) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    model = Residual()
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), batch_dim)
    if batch_dim is not None:
        assert set(routes(engine, model).values()) == {"closed_form"}


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), nn.Conv3d(2, 3, 2, padding=1)]
)
def test_conv1d_and_conv3d(conv: nn.Module) -> None:
    torch.manual_seed(2)
    shape = (4, 3, 9) if isinstance(conv, nn.Conv1d) else (4, 2, 3, 4, 3)
    x = torch.randn(*shape, dtype=torch.float64)
    engine = assert_exact(conv, lambda m: m(x).pow(2).flatten(1).sum(dim=1), 0)
    assert set(engine._last_routes.values()) == {"closed_form"}


def test_weight_sharing_and_residual() -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 5, dtype=torch.float64)
    model = Shared()
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), 0)
    assert set(routes(engine, model).values()) == {"closed_form"}


def test_module_with_direct_parameters_and_children() -> None:
    torch.manual_seed(4)
    x = torch.randn(6, 5, dtype=torch.float64)
    model = DirectAndChildren()
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), 0)
    # The module's own parameters scale and shift activations: projections of the same pass.
    assert set(routes(engine, model).values()) == {"closed_form"}


def test_frozen_parameters_are_left_out() -> None:
    torch.manual_seed(5)
    x = torch.randn(6, 5, dtype=torch.float64)
    model = mlp().double()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), 0)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_tuple_dict_and_kwargs_modules(batch_dim: int | None) -> None:
    torch.manual_seed(6)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert_exact(PyTreeModel(), lambda m: m(x).pow(2), batch_dim)


def test_embedding_layer_norm_linear() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.LayerNorm(4), nn.Linear(4, 1))
    tokens = torch.randint(0, 10, (5, 3))
    tokens[0, 0] = 0
    engine = assert_exact(model, lambda m: m(tokens).pow(2).sum(dim=(1, 2)), 0)
    assert set(engine._last_routes.values()) == {"closed_form"}


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first: bool) -> None:
    torch.manual_seed(8)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    # Batch and sequence of the same size: the batch dim is told apart by the probe row.
    x = torch.randn(4, 4, 8, dtype=torch.float64)
    batch_dim = 0 if batch_first else 1
    reduce_dims = (1, 2) if batch_first else (0, 2)
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=reduce_dims), 0)
    assert "exact" not in set(routes(engine, model).values())
    del batch_dim


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_batch_first(kind: type[nn.Module]) -> None:
    torch.manual_seed(9)
    model = kind(4, 3, num_layers=2, batch_first=True)
    x = torch.randn(5, 6, 4, dtype=torch.float64)

    def forward(m: Callable[..., object]) -> Tensor:
        out, _ = m(x)  # type: ignore[misc]
        return out.pow(2).sum(dim=(1, 2))

    engine = assert_exact(model, forward, 0)
    # Their weights are projections used at every step, proven from the graph.
    assert set(engine._last_routes.values()) == {"closed_form"}


def test_lstm_final_state_with_batch_on_dim_1() -> None:
    torch.manual_seed(10)
    model = nn.LSTM(4, 3, batch_first=True)
    x = torch.randn(5, 6, 4, dtype=torch.float64)

    def forward(m: Callable[..., object]) -> Tensor:
        out, (h, _) = m(x)  # type: ignore[misc]
        return out.sum(dim=(1, 2)) + h.pow(2).sum(dim=(0, 2))

    assert_exact(model, forward, 0)


@pytest.mark.parametrize("batch_dim", [0, 1, -1])
def test_generalized_output_batch_first_or_last(batch_dim: int) -> None:
    torch.manual_seed(11)
    x = torch.randn(6, 5, dtype=torch.float64)

    def forward(m: Callable[..., object]) -> Tensor:
        out = m(x).pow(2)  # type: ignore[union-attr]
        return out if batch_dim == 0 else out.T

    engine = assert_exact(mlp(), forward, batch_dim)
    assert set(engine._last_routes.values()) == {"closed_form"}


def test_three_dim_output_with_batch_in_the_middle() -> None:
    torch.manual_seed(12)
    x = torch.randn(4, 5, dtype=torch.float64)
    model = nn.Linear(5, 6)
    assert_exact(model, lambda m: m(x).reshape(4, 2, 3).permute(1, 0, 2).pow(2), 1)


def test_scalar_output_without_batch_dim() -> None:
    torch.manual_seed(13)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert_exact(mlp(), lambda m: m(x).pow(2).sum(), None)


def test_batch_norm_with_batch_dim_warns_naming_it_and_stays_exact() -> None:
    """Batch statistics make each loss depend on every instance. With batch_dim set the layers
    before the norm take the exact route (the probes see the mixing), those after it and the norm
    itself keep theirs, and the Gramian is the per-instance losses' own; a warning names the
    layer. It raised, advising batch_dim=None, which reads the losses as per-task ones (summed,
    not joined, over micro-batches and ranks)."""
    torch.manual_seed(14)
    norm = nn.BatchNorm1d(4, track_running_stats=False)  # batch statistics, train or eval
    model = nn.Sequential(nn.Linear(5, 4), norm, nn.Linear(4, 1)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"BatchNorm1d '1' mixes the instances"):
        engine = assert_exact(model, lambda m: m(x).squeeze(1).pow(2), 0)
    taken = routes(engine, model)
    assert taken["0.weight"] == "exact" and taken["2.weight"] == "closed_form"
    assert_exact(model, lambda m: m(x).squeeze(1).pow(2), None)

    running = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(9, 1)
    ).double()
    inputs = torch.randn(6, 2, 5, dtype=torch.float64)
    engine = Engine(running, batch_dim=0)
    for call in range(2):  # warned once
        output = running(inputs).squeeze(1).pow(2)  # training mode: running statistics move
        with pytest.warns(UserWarning, match="BatchNorm1d") if call == 0 else _no_warning():
            gramian = engine.compute_gramian(output)
        expected = loop_gramian(output, list(running.parameters()))
        assert relative_error(gramian, expected) <= 1e-10
    running.eval()  # running statistics: instances are independent again
    assert_exact(running, lambda m: m(inputs).squeeze(1).pow(2), 0)


def test_dropout_in_train_mode() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    for batch_dim in (0, None):
        engine = Engine(model, batch_dim=batch_dim)
        output = model(x).pow(2).sum(dim=1)
        gramian = engine.compute_gramian(output)
        expected = loop_gramian(output, list(model.parameters()))
        assert relative_error(gramian, expected) <= 1e-10


class FunctionalUse(nn.Module):
    """A weight used both by its module and functionally, plus a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.extra = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.embed(x))
        return h @ self.embed.weight  # tied output projection


def test_parameters_used_outside_their_module_are_exact() -> None:
    torch.manual_seed(16)
    model = FunctionalUse().double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def forward(m: Callable[..., object]) -> Tensor:
        out = m(x)  # type: ignore[operator]
        return out.pow(2).sum(dim=1) + 0.5 * (model.extra**2).sum()

    # ``extra`` lives outside every module forward; ``embed.weight`` is tied.
    model_params = list(model.parameters())
    engine = Engine(model, batch_dim=0)
    output = forward(model)
    gramian = engine.compute_gramian(output)
    expected = loop_gramian(output, model_params)
    assert relative_error(gramian, expected) <= 1e-10
    assert routes(engine, model) == {
        "embed.weight": "exact",
        "embed.bias": "closed_form",
        "extra": "exact",
    }


class SharedPositions(nn.Module):
    """A Linear applied to an unbatched table whose length equals the batch size."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.positions = nn.Linear(3, 4)
        self.tokens = nn.Linear(2, 4)
        self.register_buffer("table", torch.randn(length, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x) + self.positions(self.table)


def test_unbatched_tensor_with_batch_sized_dim_is_not_mistaken_for_a_batch() -> None:
    torch.manual_seed(17)
    x = torch.randn(4, 4, 2, dtype=torch.float64)  # batch 4, sequence 4
    model = SharedPositions(4)
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=(1, 2)), 0)
    route = routes(engine, model)
    assert route["tokens.weight"] == "closed_form"
    assert route["positions.weight"] == "exact"


def test_later_steps_reuse_the_checked_batch_dims_and_stay_exact() -> None:
    torch.manual_seed(18)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    engine = Engine(model, batch_dim=0)
    for _ in range(3):
        x = torch.randn(3, 3, 8, dtype=torch.float64)
        output = model(x).pow(2).sum(dim=(1, 2))
        gramian = engine.compute_gramian(output)
        expected = loop_gramian(output, list(model.parameters()))
        assert relative_error(gramian, expected) <= 1e-10


LAYER_VARIANTS = {
    "conv2d-stride-dilation": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2),
        (3, 3, 9, 9),
        "closed_form",
    ),
    "conv2d-groups": (lambda: nn.Conv2d(4, 4, 3, groups=2), (3, 4, 6, 6), "local"),
    "conv2d-same": (lambda: nn.Conv2d(3, 4, 3, padding="same"), (3, 3, 6, 6), "local"),
    "conv2d-reflect": (
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        (3, 3, 6, 6),
        "local",
    ),
    "conv1d-no-bias": (lambda: nn.Conv1d(3, 4, 2, bias=False), (3, 3, 6), "closed_form"),
    "conv3d-stride": (
        lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)),
        (3, 2, 4, 5, 3),
        "closed_form",
    ),
    "layer-norm-2d": (lambda: nn.LayerNorm((3, 4)), (3, 5, 3, 4), "closed_form"),
    "layer-norm-no-bias": (lambda: nn.LayerNorm(4, bias=False), (3, 5, 4), "closed_form"),
    "group-norm-1d": (lambda: nn.GroupNorm(2, 4), (3, 4, 5), "closed_form"),
    "linear-4d": (lambda: nn.Linear(4, 2), (3, 2, 5, 4), "closed_form"),
    "instance-norm": (lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 6), "closed_form"),
    "prelu": (lambda: nn.PReLU(4), (3, 4), "local"),
}


@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_layer_variants(variant: str) -> None:
    torch.manual_seed(19)
    build, shape, route = LAYER_VARIANTS[variant]
    x = torch.randn(*shape, dtype=torch.float64)
    model = build()
    engine = assert_exact(model, lambda m: m(x).pow(2).flatten(1).sum(dim=1), 0)
    assert set(routes(engine, model).values()) == {route}


def test_in_place_activation_after_a_closed_form_layer() -> None:
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(4, 5, dtype=torch.float64)
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), 0)
    assert set(engine._last_routes.values()) == {"closed_form"}


class TiedModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_parameter_shared_by_two_modules() -> None:
    torch.manual_seed(21)
    x = torch.randn(4, 5, dtype=torch.float64)
    model = TiedModules()
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=1), 0)
    assert routes(engine, model) == {
        "a.weight": "exact",
        "a.bias": "closed_form",
        "b.bias": "closed_form",
    }


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 2)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)
        assert isinstance(hidden, Tensor)
        return self.head(hidden)


@pytest.mark.parametrize("batch_dim", [0, None])
def test_gradient_checkpointing(batch_dim: int | None) -> None:
    torch.manual_seed(22)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    model = Checkpointed(reentrant=False).double()
    engine = Engine(model, batch_dim=batch_dim)
    output = model(x).pow(2).sum(dim=1)
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    hidden = Checkpointed(reentrant=True).double()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        Engine(hidden, batch_dim=batch_dim).compute_gramian(hidden(x).pow(2).sum(dim=1))


def test_a_zero_loss_for_instance_0_keeps_the_closed_form() -> None:
    torch.manual_seed(23)
    model = mlp().double()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    for first in (0.0, 1.0):
        scale = torch.tensor([first, 1.0, 1.0, 1.0], dtype=torch.float64)
        output = model(x).pow(2).sum(dim=1) * scale
        gramian = engine.compute_gramian(output)
        assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
        assert set(engine._last_routes.values()) == {"closed_form"}


class Gain(nn.Module):
    """A module of its own whose parameter no closed form covers (the local route): it scales
    through a function of itself, not itself."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.exp(self.gain)


class EveryRoute(nn.Module):
    """Closed forms (embedding, encoder, the GRU's projections), replay (cross-attention), local
    (a gain); 3 losses each."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.embedding = nn.Embedding(7, 8)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = nn.GRU(8, 3, batch_first=True)
        self.gain = Gain(3)

    def forward(self, tokens: Tensor) -> Tensor:
        embedded = self.embedding(tokens)
        encoded = self.encoder(embedded)
        mixed, _ = self.cross(encoded, embedded, embedded, need_weights=False)
        out, _ = self.gru(mixed)
        losses: Tensor = self.gain(out).pow(2).sum(dim=1)  # [B, 3]
        return losses


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_generalized_output_through_every_route(batch_dim: int) -> None:
    torch.manual_seed(24)
    tokens = torch.randint(0, 7, (3, 4))

    def forward(m: Callable[..., object]) -> Tensor:
        losses = m(tokens)
        assert isinstance(losses, Tensor)
        return losses if batch_dim == 0 else losses.T

    engine = assert_exact(EveryRoute(), forward, batch_dim)
    assert set(engine._last_routes.values()) == {"closed_form", "replay", "local"}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["batch statistics", "tracked, train", "tracked, eval"])
def test_instance_norm_takes_its_closed_form(dims: int, mode: str) -> None:
    """An affine map per channel of the input normalised per instance and channel (by the running
    statistics in eval mode when tracked). Its parameters took the local route (per-instance
    products of the layer's graph) and its passes the probes: 3x the Gramian's time."""
    torch.manual_seed(16)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](2, 3, 3)
    norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1](
        3, affine=True, track_running_stats=mode != "batch statistics"
    )
    model = nn.Sequential(conv, norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn((5, 2) + (5,) * dims, dtype=torch.float64)
    model(x)  # materialises the lazy head and moves the running statistics off their defaults
    if mode == "tracked, eval":
        model.eval()
    losses = lambda m: m(x).pow(2).sum(dim=1)  # noqa: E731
    if mode == "tracked, train":  # the running statistics' update defeats jacrev: by rows
        engine = Engine(model, batch_dim=0)
        output = losses(model)
        gramian = engine.compute_gramian(output)
        assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    else:
        engine = assert_exact(model, losses, 0)
    taken = routes(engine, model)
    assert taken["1.weight"] == "closed_form" and taken["1.bias"] == "closed_form"
