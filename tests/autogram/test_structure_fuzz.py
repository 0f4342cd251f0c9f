"""Random programs between a layer and the losses: the Gramian is exact whatever the proof says.

Each program applies a random chain of tensor operations (reshapes, transposes, reductions,
products, concatenations, paddings, flips...) to a ``Linear`` layer's output, then sums all but
one dim of the batch size into the losses: sometimes the instances' own dim, sometimes another dim
of the same size (the losses then mix the instances). A structural proof that holds where it should
not would give a wrong closed form, which the comparison with per-loss autograd catches.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine
from tests.autogram._reference import engine_gramian_and_grads, loop_gramian, relative_error
from tests.autogram.conftest import Proofs

BATCH = 3
Op = Callable[[Tensor, random.Random], Tensor | None]


def _dim(t: Tensor, rng: random.Random) -> int:
    return rng.randrange(t.ndim)


def _merge(t: Tensor, rng: random.Random) -> Tensor | None:
    if t.ndim < 2:
        return None
    d = rng.randrange(t.ndim - 1)
    return t.reshape(*t.shape[:d], t.shape[d] * t.shape[d + 1], *t.shape[d + 2 :])


def _split(t: Tensor, rng: random.Random) -> Tensor | None:
    d = _dim(t, rng)
    size = t.shape[d]
    factors = [f for f in (2, 3) if size % f == 0 and size > f]
    if not factors:
        return None
    f = rng.choice(factors)
    return t.reshape(*t.shape[:d], f, size // f, *t.shape[d + 1 :])


def _transpose(t: Tensor, rng: random.Random) -> Tensor | None:
    return None if t.ndim < 2 else t.transpose(*rng.sample(range(t.ndim), 2))


def _permute(t: Tensor, rng: random.Random) -> Tensor | None:
    order = list(range(t.ndim))
    rng.shuffle(order)
    return t.permute(order)


def _reduce(t: Tensor, rng: random.Random) -> Tensor | None:
    if t.ndim < 2:
        return None
    d = _dim(t, rng)
    kind = rng.choice(["sum", "mean", "amax", "logsumexp"])
    keep = rng.random() < 0.5
    if kind == "logsumexp":
        return t.logsumexp(d, keepdim=keep)
    return getattr(t, kind)(dim=d, keepdim=keep)  # type: ignore[no-any-return]


def _along(t: Tensor, rng: random.Random) -> Tensor | None:
    d = _dim(t, rng)
    return rng.choice([lambda: t.softmax(d), lambda: t.cumsum(d), lambda: t.flip(d)])()


def _combine(t: Tensor, rng: random.Random) -> Tensor | None:
    d = _dim(t, rng)
    kind = rng.choice(["cat", "stack", "centre", "product", "outer"])
    if kind == "cat":
        return torch.cat([t, t.tanh()], dim=d)
    if kind == "stack":
        return torch.stack([t, 2 * t], dim=d).sum(dim=d)
    if kind == "centre":
        return t - t.mean(dim=d, keepdim=True)
    if kind == "product":
        shared = torch.linspace(-1, 1, t.shape[-1] ** 2, dtype=t.dtype).view(t.shape[-1], -1)
        return t @ shared
    return None if t.ndim < 2 else t @ t.transpose(-1, -2)


def _index(t: Tensor, rng: random.Random) -> Tensor | None:
    d = _dim(t, rng)
    size = t.shape[d]
    if size < 2:
        return None
    kind = rng.choice(["select", "narrow", "pad", "repeat", "roll", "index_select"])
    if kind == "select":
        return t.select(d, rng.randrange(size))
    if kind == "narrow":
        return t.narrow(d, 1, size - 1)
    if kind == "pad":
        pad = [0, 0] * (t.ndim - 1 - d) + [1, 0]
        return F.pad(t, pad)
    if kind == "repeat":
        repeats = [1] * t.ndim
        repeats[d] = 2
        return t.repeat(*repeats)
    if kind == "roll":
        return t.roll(1, d)
    return t.index_select(d, torch.tensor([size - 1, 0]))


def _elementwise(t: Tensor, rng: random.Random) -> Tensor | None:
    return rng.choice([torch.tanh, torch.sigmoid, lambda u: u * u, lambda u: F.gelu(u)])(t)


OPS: list[Op] = [
    _merge,
    _split,
    _transpose,
    _permute,
    _reduce,
    _along,
    _combine,
    _index,
    _elementwise,
]


def _program(seed: int) -> Callable[[Tensor], Tensor | None]:
    """A random chain of operations, then losses along a dim of size ``BATCH`` (or ``None``)."""

    def run(h: Tensor) -> Tensor | None:
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 5)):
            if h.numel() > 4000:
                break
            result = rng.choice(OPS)(h, rng)
            if result is not None and result.ndim > 0 and result.numel() > 0:
                h = result
        dims = [d for d in range(h.ndim) if h.shape[d] == BATCH]
        if not dims:
            return None
        d = rng.choice(dims)
        return h.movedim(d, 0).reshape(BATCH, -1).pow(2).sum(dim=1)

    return run


def test_random_programs_give_exact_gramians(proofs: Proofs) -> None:
    checked = 0
    for seed in range(1000):
        torch.manual_seed(seed)
        layer = nn.Linear(4, 3).double()  # as many features as instances: ambiguous sizes
        middle = [(), (2 + seed % 3,), (2, 3)][seed % 3 if seed % 7 else 0]
        x = torch.randn(BATCH, *middle, 4, dtype=torch.float64)
        losses = _program(seed)(layer(x))
        if losses is None:
            continue
        with Engine(layer, batch_dim=0) as engine:
            losses = _program(seed)(layer(x))
            assert losses is not None
            gramian = engine.compute_gramian(losses)
        expected = loop_gramian(losses, list(layer.parameters()))
        assert relative_error(gramian, expected) <= 1e-9, f"program {seed}"
        checked += 1
    proven = sum(p is not None for p in proofs)
    # Not vacuous: many programs ran, and the proof went through on a good share of them.
    assert checked >= 600 and proven >= checked // 4, (checked, proven)


class _RandomLayer(nn.Module):
    """A module of its own whose weights a random program uses: as ``F.linear`` weights (once or
    several times, with or without the bias), added, expanded or multiplied into the activations
    (shared by the instances, or one entry each), and sometimes otherwise (a plain product, an elementwise
    factor), between operations that keep or mix the instances."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)
        self.other = nn.Parameter(torch.randn(4, 4) / 2)
        self.bias = nn.Parameter(torch.randn(4))
        self.offset = nn.Parameter(torch.randn(4))
        self.rows = nn.Parameter(torch.randn(BATCH, 1))  # one entry per instance: not shared

    def forward(self, h: Tensor) -> Tensor:
        rng = random.Random(self.seed)
        weights = [self.weight, self.other]
        h = F.linear(h, self.weight)
        for _ in range(rng.randint(1, 5)):
            w = rng.choice(weights)
            kind = rng.choice(
                [
                    *["linear", "linear", "linear_bias", "matmul", "scale"],
                    *["tanh", "swap", "mix", "offset", "expanded", "per_instance", "scaled"],
                ]
            )
            if kind == "linear":
                h = F.linear(h, w)
            elif kind == "linear_bias":
                h = F.linear(h, w, self.bias)
            elif kind == "matmul":
                h = h @ w  # W itself as the second factor: not a projection
            elif kind == "scale":
                h = h * w[0]
            elif kind == "tanh":
                h = torch.tanh(h)
            elif kind == "swap" and h.ndim == 3:
                h = h.transpose(1, 2).softmax(dim=-1).transpose(1, 2)
            elif kind == "offset":
                h = h + self.offset
            elif kind == "expanded":
                h = h * self.offset.expand_as(h)
            elif kind == "scaled":
                h = h * self.offset
            elif kind == "per_instance" and h.ndim == 2:
                h = h + self.rows
            elif kind == "mix":
                h = h + rng.choice([lambda u: u.flip(0), lambda u: u.mean(0, keepdim=True)])(h)
        return h


def test_random_layers_with_projections_give_exact_gramians() -> None:
    projected = 0
    for seed in range(300):
        torch.manual_seed(seed)
        layer = _RandomLayer(seed).double()
        x = torch.randn(BATCH, *([4] if seed % 2 else []), 4, dtype=torch.float64)

        def losses(m: Callable[..., Tensor]) -> Tensor:
            return m(x).pow(2).reshape(BATCH, -1).sum(dim=1)

        with Engine(layer, batch_dim=0) as engine:
            gramian, fused, expected = engine_gramian_and_grads(engine, layer, losses)
            routes = set(engine._last_routes.values())
        assert (
            relative_error(gramian, loop_gramian(losses(layer), list(layer.parameters()))) <= 1e-9
        ), f"program {seed}"
        assert fused.keys() == expected.keys(), f"program {seed}"  # unused parameters: neither
        for name, grad in expected.items():
            torch.testing.assert_close(fused[name], grad, rtol=1e-9, atol=1e-12)
        projected += routes == {"closed_form"}
    # The uses were taken (121 of the 300 programs), not only refused.
    assert projected >= 80, projected
