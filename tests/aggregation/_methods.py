"""Every core aggregation method, with the properties the common tests rely on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from jdoptim.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    Constant,
    DualProj,
    Krum,
    Mean,
    PCGrad,
    Random,
    Sum,
    TrimmedMean,
    UPGrad,
)


@dataclass(frozen=True)
class Method:
    name: str
    make: Callable[[int], Aggregator]  # number of rows -> aggregator
    min_rows: int = 1
    #: the aggregation does not depend on the order of the rows (up to round-off)
    permutation_invariant: bool = True
    #: the same input always gives the same output
    deterministic: bool = True

    def __str__(self) -> str:
        return self.name


METHODS = [
    Method("Mean", lambda m: Mean()),
    Method("Sum", lambda m: Sum()),
    Method(
        "Constant",
        lambda m: Constant(torch.arange(1, m + 1, dtype=torch.float64)),
        permutation_invariant=False,
    ),
    Method("Random", lambda m: Random(), permutation_invariant=False, deterministic=False),
    Method("UPGrad", lambda m: UPGrad()),
    Method("DualProj", lambda m: DualProj()),
    Method("MGDA", lambda m: MGDA()),
    Method("PCGrad", lambda m: PCGrad(), permutation_invariant=False, deterministic=False),
    Method("IMTLG", lambda m: IMTLG()),
    # Ties between equal scores are broken by index, so Krum is only order-free without ties.
    Method("Krum", lambda m: Krum(n_byzantine=1, n_selected=2), min_rows=4),
    Method("TrimmedMean", lambda m: TrimmedMean(trim_number=1), min_rows=3),
]
METHOD_IDS = [method.name for method in METHODS]
