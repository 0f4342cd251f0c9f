"""TrimmedMean: the coordinate-wise trimmed mean of the rows."""

from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import Aggregator
from jdoptim.aggregation._hyper import integer_at_least, validators


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., *Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates*, ICML 2018).

    For every coordinate, the ``trim_number`` largest and ``trim_number`` smallest values over the
    rows are discarded and the remaining ``m − 2·trim_number`` are averaged. It is not of the form
    ``wᵀJ`` with one weight per row, so it has no weighting form.

    Args:
        trim_number: how many values to discard at each end; the Jacobian needs more than
            ``2·trim_number`` rows.
    """

    differentiable = True
    coordinate_wise = True

    hyper_parameters = validators(
        trim_number=integer_at_least("trim_number", 0),
    )

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
            raise ValueError(f"trim_number must be a non-negative int, got {trim_number!r}.")
        self.trim_number = trim_number

    def forward(self, matrix: Tensor, /) -> Tensor:
        rows = matrix.shape[0]
        if rows <= 2 * self.trim_number:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) needs at least "
                f"{2 * self.trim_number + 1} rows (2 * trim_number + 1), got a Jacobian with "
                f"{rows}; lower trim_number or aggregate more rows."
            )
        ordered = matrix.sort(dim=0).values
        return ordered[self.trim_number : rows - self.trim_number].mean(dim=0)

    def _repr_args(self) -> str:
        return f"trim_number={self.trim_number}"
