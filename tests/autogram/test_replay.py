"""Attention layers: self-attention in closed form, others replayed when possible; all exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.autogram._replay import hooks_are_suspended, hooks_suspended
from tests.autogram._reference import loop_gramian, relative_error, routes
from tests.autogram.test_engine import assert_exact


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_attention_has_a_closed_form(batch_first: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 4, 8, dtype=dtype)
    dims = (1, 2) if batch_first else (0, 2)
    engine = assert_exact(model, lambda m: m(x).pow(2).sum(dim=dims), 0, dtype)
    assert set(routes(engine, model).values()) == {"closed_form"}


def test_self_attention_with_masks_has_a_closed_form() -> None:
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(6, 2, batch_first=True)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[2, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)

    def forward(m: Callable[..., object]) -> Tensor:
        out = m(
            x,
            x,
            x,
            key_padding_mask=padding.double().masked_fill(padding, float("-inf")),
            attn_mask=causal,
            need_weights=False,
        )
        assert isinstance(out, tuple)
        return out[0].pow(2).sum(dim=(1, 2))

    engine = assert_exact(attention, forward, 0)
    assert set(routes(engine, attention).values()) == {"closed_form"}


class Attention(nn.Module):
    def __init__(self, dropout: float = 0.0, need_weights: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(
            6, 2, dropout=dropout, batch_first=True, kdim=4, vdim=5
        )
        self.need_weights = need_weights

    def forward(self, q: Tensor, k: Tensor, v: Tensor, padding: Tensor, mask: Tensor) -> Tensor:
        out, weights = self.attention(
            q, k, v, key_padding_mask=padding, attn_mask=mask, need_weights=self.need_weights
        )
        return out if weights is None else out * weights.sum(dim=-1, keepdim=True)


def _inputs() -> tuple[Tensor, ...]:
    q = torch.randn(4, 3, 6, dtype=torch.float64)
    k = torch.randn(4, 5, 4, dtype=torch.float64)
    v = torch.randn(4, 5, 5, dtype=torch.float64)
    padding = torch.zeros(4, 5, dtype=torch.bool)
    padding[1, -2:] = True
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 0] = True  # query 0 may not attend to key 0
    return q, k, v, padding, mask


def test_cross_attention_with_masks_is_replayed() -> None:
    torch.manual_seed(1)
    inputs = _inputs()
    model = Attention()
    forward: Callable[[Callable[..., object]], Tensor] = lambda m: m(*inputs).pow(2).sum(dim=(1, 2))  # noqa: E731
    engine = assert_exact(model, forward, 0)
    assert set(routes(engine, model).values()) == {"replay"}


@pytest.mark.parametrize("variant", ["dropout", "weights"])
def test_attention_that_cannot_be_replayed_takes_the_local_route(variant: str) -> None:
    torch.manual_seed(2)
    inputs = _inputs()
    model = Attention(
        dropout=0.5 if variant == "dropout" else 0.0, need_weights=variant == "weights"
    )
    model = model.double()
    engine = Engine(model, batch_dim=0)
    output = model(*inputs).pow(2).sum(dim=(1, 2))
    gramian = engine.compute_gramian(output)
    assert relative_error(gramian, loop_gramian(output, list(model.parameters()))) <= 1e-10
    assert set(routes(engine, model).values()) == {"local"}


def test_hooks_suspension_nests() -> None:
    assert not hooks_are_suspended()
    with hooks_suspended():
        with hooks_suspended():
            assert hooks_are_suspended()
        assert hooks_are_suspended()
    assert not hooks_are_suspended()
