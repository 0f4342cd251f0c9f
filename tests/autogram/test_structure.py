"""The structural proof of independence: used where it holds, never where the instances mix.

Where the graph's structure proves that loss ``i`` reaches only slice ``i`` of each layer output,
the pass skips its probe rows; everywhere else the probes decide. Each model below is checked
twice: whether the proof went through (the standard layers must not fall back to the probes, the
mixing constructions must not be proven), and the Gramian against per-loss ``autograd.grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, _batched
from jdoptim.autogram._structure import Proof, _locate, _Walk, prove
from tests.autogram._reference import loop_gramian, relative_error
from tests.autogram.conftest import Proofs


def _exact(engine: Engine, model: nn.Module, output: Tensor) -> None:
    gramian = engine.compute_gramian(output)
    expected = loop_gramian(output, [p for p in model.parameters() if p.requires_grad])
    assert relative_error(gramian, expected) <= 1e-10


class _Attention(nn.Module):
    """Self-attention through ``scaled_dot_product_attention``, heads split by view/transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.norm(x + self.out(y.transpose(1, 2).reshape(b, s, 8)))


class _Padded(nn.Module):
    """Pads the width and tiles the channels' maps side by side."""

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (1, 1, 0, 0)).repeat(1, 1, 1, 2)[..., :12]


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


Case = tuple[nn.Module, Callable[[nn.Module], Tensor], int]


def _standard_cases() -> dict[str, Callable[[], Case]]:
    """Per case: the model, its losses from the model, their batch dim."""

    def mlp() -> Case:
        model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Dropout(0.2), nn.Linear(6, 3))
        x, y = torch.randn(6, 5), torch.arange(6) % 3
        return model, lambda m: F.cross_entropy(m(x), y, reduction="none"), 0

    def cnn() -> Case:
        x, y = torch.randn(5, 2, 8, 8), torch.arange(5) % 3
        return _ConvNet(), lambda m: F.cross_entropy(m(x), y, reduction="none"), 0

    def attention() -> Case:
        x = torch.randn(4, 4, 8)  # batch and sequence of one size
        return _Attention(), lambda m: m(x).pow(2).mean(dim=(1, 2)), 0

    def encoder_sequence_first() -> Case:
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        x = torch.randn(3, 4, 8)  # [S, B, E]
        return model, lambda m: m(x).pow(2).sum(dim=(0, 2)), 0

    def frozen_batch_norm_padding_prelu() -> Case:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.PReLU(3),
            _Padded(),
            nn.Flatten(),
            nn.Linear(3 * 6 * 12, 2),
        )
        model[1].eval()  # running statistics: an affine map of each entry
        x, target = torch.randn(5, 2, 8, 8), torch.randn(5, 2)
        return model, lambda m: F.huber_loss(m(x), target, reduction="none").mean(dim=1), 0

    def instance_norm() -> Case:
        # Runs as batch norm with batch statistics on [1, B·C, H, W]: one instance per channel.
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.InstanceNorm2d(3, affine=True),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        )
        x = torch.randn(5, 2, 6, 6)
        return model, lambda m: m(x).pow(2).sum(dim=1), 0

    def gru() -> Case:
        x = torch.randn(5, 6, 4)

        def losses(m: nn.Module) -> Tensor:
            out, _ = m(x)
            return out[:, -1].pow(2).sum(dim=1)  # type: ignore[no-any-return]

        return nn.GRU(4, 3, batch_first=True), losses, 0

    def embedding_multitask() -> Case:
        model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        tokens = torch.randint(0, 10, (5, 3))
        target = torch.zeros(5, 2)
        return model, lambda m: F.mse_loss(m(tokens).mean(dim=1), target, reduction="none"), 0

    def regression_losses_batch_last() -> Case:
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        x, target = torch.randn(6, 4), torch.rand(6, 2)

        def losses(m: nn.Module) -> Tensor:
            out = m(x)
            smooth = F.smooth_l1_loss(out, target, reduction="none").sum(dim=1)
            bce = F.binary_cross_entropy_with_logits(out, target, reduction="none").amax(dim=1)
            return torch.stack([smooth, bce], dim=0)  # [tasks, B]

        return model, losses, 1

    return {name: case for name, case in locals().items() if callable(case)}


STANDARD = _standard_cases()


def _standard(name: str) -> Case:
    """The standard case ``name``, built seeded and in float64."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        return STANDARD[name]()
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", list(STANDARD))
def test_standard_models_are_proven_without_probe_rows(name: str, proofs: Proofs) -> None:
    model, losses, batch_dim = _standard(name)
    engine = Engine(model, batch_dim=batch_dim)
    _exact(engine, model, losses(model))
    assert proofs and all(p is not None and None not in p.strides for p in proofs)
    assert "exact" not in set(engine._last_routes.values())


@pytest.mark.parametrize("name", list(STANDARD))
def test_the_elementwise_shortcut_gives_the_general_proof(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Elementwise operations whose inputs have their output's shape pass the stride on without
    their rule (``_Walk._passes_through``); the proof is the one the rules give."""
    model, losses, batch_dim = _standard(name)
    calls: list[tuple[object, ...]] = []
    original = _batched.prove

    def recording(*args: object) -> Proof | None:
        calls.append(args)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_batched, "prove", recording)
    engine = Engine(model, batch_dim=batch_dim)
    engine.compute_gramian(losses(model))
    shortcut = [prove(*args) for args in calls]  # type: ignore[arg-type]
    monkeypatch.setattr(_Walk, "_passes_through", lambda self, node, children: False)
    general = [prove(*args) for args in calls]  # type: ignore[arg-type]
    assert shortcut and all(p is not None for p in shortcut)
    for fast, slow in zip(shortcut, general, strict=True):
        assert fast is not None and slow is not None
        assert fast.strides == slow.strides and fast.consumers == slow.consumers


Mix = Callable[[nn.Module, Tensor], Tensor]


def _mixes() -> dict[str, Mix]:
    """Per-instance losses of a two-layer MLP whose hidden activations ``h`` mix instances."""

    def hidden(model: nn.Module, x: Tensor) -> Tensor:
        return torch.tanh(model[0](x))  # type: ignore[index, no-any-return]

    def head(model: nn.Module, h: Tensor) -> Tensor:
        return model[2](h).pow(2).sum(dim=1)  # type: ignore[index, no-any-return]

    def batch_mean(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h - h.mean(dim=0))

    def batch_softmax(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, hidden(m, x).softmax(dim=0))

    def shared_row(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h + h[:1])  # broadcast of instance 0 to all

    def gram(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, (h @ h.T) @ h)  # the second factor carries the instances

    def transposed_product(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, (h.T @ torch.ones(h.shape[0], h.shape[0], dtype=h.dtype)).T)

    def merged_then_mixed(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)  # [6, 4] -> [24] -> softmax over everything
        return head(m, h.reshape(-1).softmax(dim=0).view_as(h))

    def reinterpreted(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)  # [6, 4] viewed as [4, 6]: the rows no longer are the instances
        return head(m, h.view(4, 6).cumsum(dim=0).view(6, 4))

    def concatenated(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, torch.cat([h[3:], h[:3]], dim=0))

    def split_and_stacked(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, torch.stack(list(reversed(h.unbind(0))), dim=0))

    def batch_norm(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, F.batch_norm(hidden(m, x), None, None, training=True))

    def layer_norm_across(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, F.layer_norm(h.T, (6,)).T)

    def attention_across(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)[None, None]  # [1, 1, B, 4]: the instances are the positions
        return head(m, F.scaled_dot_product_attention(h, h, h)[0, 0])

    def sliced(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, torch.cat([h, 2 * h], dim=0)[3:9])

    def gathered(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        index = torch.zeros_like(h, dtype=torch.long)
        return head(m, h.gather(0, index))

    def expanded_sum(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h.sum(dim=0, keepdim=True).expand_as(h))

    def full_sum(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h * h.sum())

    def max_over_batch(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h - h.max(dim=0, keepdim=True).values)

    def softmax_after_transpose(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, hidden(m, x).T.softmax(dim=-1).T)

    def normalized_over_batch(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, F.normalize(hidden(m, x), dim=0))

    def batched_product_second_factor(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)  # [B, 4]: the instances in the columns of the second factor
        mixed = torch.bmm(torch.ones(1, h.shape[0], h.shape[0], dtype=h.dtype), h[None])
        return head(m, mixed[0])

    def padded_along_the_batch(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, F.pad(hidden(m, x), (0, 0, 1, -1)))  # instance i takes row i - 1

    def repeated_along_the_batch(m: nn.Module, x: Tensor) -> Tensor:
        h = hidden(m, x)
        return head(m, h.repeat(2, 1).view(2, -1, h.shape[1])[:, 1:].reshape(-1, h.shape[1])[:6])

    def custom_function(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, _Shift.apply(hidden(m, x)))

    def batch_statistics(m: nn.Module, x: Tensor) -> Tensor:
        return head(m, F.batch_norm(hidden(m, x), None, None, training=True))

    return {
        name: mix
        for name, mix in locals().items()
        if callable(mix) and name not in ("hidden", "head")
    }


class _Shift(torch.autograd.Function):
    """Instance ``i`` takes instance ``i + 1``'s row: a mixing the graph cannot show."""

    @staticmethod
    def forward(ctx: object, h: Tensor) -> Tensor:
        return h.roll(1, 0)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.roll(-1, 0)


MIXES = _mixes()


@pytest.mark.parametrize("name", list(MIXES))
def test_mixing_is_never_proven(name: str, proofs: Proofs) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = Engine(model, batch_dim=0)
    output = MIXES[name](model, torch.randn(6, 5, dtype=torch.float64))
    _exact(engine, model, output)
    assert proofs[-1] is None
    assert engine._last_routes[id(model[0].weight)] == "exact"


def test_a_proof_is_made_again_on_every_pass(proofs: Proofs) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    engine = Engine(model, batch_dim=0)
    x = torch.randn(6, 5, dtype=torch.float64)
    for mixed in (False, True, False):
        h = torch.tanh(model[0](x))
        h = h.flip(0) if mixed else h
        _exact(engine, model, model[2](h).pow(2).sum(dim=1))
    assert [p is not None for p in proofs] == [True, False, True]


@pytest.mark.parametrize(
    ("shape", "stride", "expected"),
    [
        ((6, 4), 4, (0, 1)),
        ((4, 6), 1, (1, 1)),
        ((24, 5), 20, (0, 4)),  # [B * S, d] with B = 6, S = 4
        ((24, 5), 5, (0, 1)),  # [S * B, d]: the instance varies fastest in dim 0
        ((4, 1, 6), 1, (2, 1)),
        ((4, 6), 2, None),  # inside a dim of size 6, but B = 6 does not fit at stride 2
        ((5, 5), 4, None),  # no dim boundary at stride 4
    ],
)
def test_locate_the_instances_digit(
    shape: tuple[int, ...], stride: int, expected: tuple[int, int] | None
) -> None:
    assert _locate(shape, stride, 6) == expected
