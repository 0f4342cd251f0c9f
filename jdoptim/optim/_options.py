"""The Jacobian-descent keyword arguments shared by ``JDSGD``, ``JDAdam`` and ``JDAdamW``."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jdoptim.aggregation import Aggregator, GeneralizedWeighting, Weighting

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - typing_extensions ships with torch
    from typing_extensions import Unpack


class JDOptions(TypedDict, total=False):
    """Keyword arguments of :class:`~jdoptim.optim.JacobianDescent` besides the optimizer."""

    weighting: Weighting | GeneralizedWeighting | None
    aggregator: Aggregator | None
    scalarizer: nn.Module | None
    batch_dim: int | None
    modules: nn.Module | Iterable[nn.Module] | None
    shared_params: Iterable[Tensor] | None
    tasks_params: Sequence[Iterable[Tensor]] | None
    fuse_backward: bool
    parallel_chunk_size: int | None
    grad_scaler: torch.amp.GradScaler | None
    process_group: dist.ProcessGroup | bool | None
    gramian_weighting: Weighting | GeneralizedWeighting | None


__all__ = ["JDOptions", "Unpack"]
