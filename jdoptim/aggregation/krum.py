"""Krum and multi-Krum: Byzantine-robust selection of gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.aggregation._hyper import integer_at_least, validators
from jdoptim.linalg import normalize_gramian


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


class KrumWeighting(Weighting):
    r"""Weights of (multi-)Krum (Blanchard et al., *Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent*, NeurIPS 2017).

    With ``f = n_byzantine``, each row ``gᵢ`` gets the score ``s(i) = Σ_{j ∈ N(i)} ‖gᵢ − gⱼ‖²`` over
    its ``m − f − 2`` nearest other rows ``N(i)``. The ``n_selected`` rows of lowest score get the
    weight ``1 / n_selected`` (Krum is ``n_selected = 1``), the others 0. The distances come from
    the Gramian: ``‖gᵢ − gⱼ‖² = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ``. Ties are broken towards the lower index.

    Args:
        n_byzantine: the number ``f`` of rows that may be arbitrary; the Gramian needs at least
            ``f + 3`` rows (the paper's guarantee needs ``m > 2f + 2``).
        n_selected: how many rows to average (multi-Krum); at most ``m``.
    """

    differentiable = True

    scale_invariant = True

    hyper_parameters = validators(
        n_byzantine=integer_at_least("n_byzantine", 0),
        n_selected=integer_at_least("n_selected", 1),
    )

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = _check_count(n_byzantine, "n_byzantine", 0)
        self.n_selected = _check_count(n_selected, "n_selected", 1)

    def forward(self, gramian: Tensor, /) -> Tensor:
        rows = gramian.shape[0]
        if rows < self.n_byzantine + 3:
            raise ValueError(
                f"KrumWeighting(n_byzantine={self.n_byzantine}) needs at least "
                f"{self.n_byzantine + 3} rows (n_byzantine + 3, so that every row has a neighbour "
                f"after excluding itself and n_byzantine + 1 others), got {rows}."
            )
        if self.n_selected > rows:
            raise ValueError(
                f"n_selected={self.n_selected} is larger than the number of rows ({rows})."
            )
        matrix = normalize_gramian(gramian)
        diagonal = matrix.diagonal()
        distances = (diagonal[:, None] + diagonal[None, :] - 2 * matrix).clamp(min=0)
        distances.fill_diagonal_(float("inf"))  # a row is not its own neighbour
        n_neighbours = rows - self.n_byzantine - 2
        scores = distances.sort(dim=1).values[:, :n_neighbours].sum(dim=1)
        selected = scores.argsort(stable=True)[: self.n_selected]
        weights = torch.zeros_like(diagonal)
        weights[selected] = 1.0 / self.n_selected
        return weights

    def _repr_args(self) -> str:
        return f"n_byzantine={self.n_byzantine}, n_selected={self.n_selected}"


class Krum(GramianWeightedAggregator):
    """Aggregates the Jacobian with :class:`KrumWeighting` (same arguments)."""

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))
