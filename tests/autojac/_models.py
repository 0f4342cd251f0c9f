"""Small models with per-instance losses, and their ground-truth Jacobians from ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


class GRURegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class LSTMRegressor(GRURegressor):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)


def mlp() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    return model, torch.randn(6, 5)


def cnn() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 1),
    )
    return model, torch.randn(4, 2, 6, 6)


def gru() -> tuple[nn.Module, Tensor]:
    return GRURegressor(), torch.randn(4, 5, 3)


def lstm() -> tuple[nn.Module, Tensor]:
    return LSTMRegressor(), torch.randn(4, 5, 3)


MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "mlp": mlp,
    "cnn": cnn,
    "gru": gru,
    "lstm": lstm,
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """A float64 model, its inputs and targets (one per instance)."""
    torch.manual_seed(seed)
    model, x = MODELS[name]()
    model = model.double()
    x = x.double()
    return model, x, torch.randn(x.shape[0], dtype=torch.float64)


def losses_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-instance squared errors, shape ``[batch]``."""
    out: Tensor = model(x)
    return (out.squeeze(-1) - y) ** 2


def jacobian_rows(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Ground truth: ``[batch, *p.shape]`` per parameter, in ``model.parameters()`` order."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        return (functional_call(model, p, (x,)).squeeze(-1) - y) ** 2

    result = jacrev(losses)(params)
    return [result[name] for name in params]


def jacobian_matrix(rows: list[Tensor]) -> Tensor:
    return torch.cat([row.flatten(1) for row in rows], dim=1)
