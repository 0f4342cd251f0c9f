"""Deciding, when an optimizer is built, whether its steps are distributed and over which group."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from jdoptim.distributed._ddp import ddp_process_group
from jdoptim.distributed._step import DistributedStep


def distributed_step_for(
    process_group: dist.ProcessGroup | None,
    modules: Sequence[nn.Module] | None,
    path: str,
    grad_scaler: torch.amp.GradScaler | None,
) -> DistributedStep | None:
    """The distributed step for ``process_group`` (or the group of a DDP module in ``modules``).

    ``None`` when neither is given: steps are local. Checks what distributed steps support.
    """
    group = process_group if process_group is not None else ddp_process_group(modules)
    if group is None:
        return None
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup (such as "
            f"torch.distributed.group.WORLD or ddp_model.process_group), got {type(group).__name__}."
        )
    if not dist.is_initialized():
        raise ValueError(
            "process_group= was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
        )
    if path == "cross_gramian":
        raise ValueError(
            "Cross-Gramian weightings (SDMGrad, MoDo) are not supported in distributed mode "
            "(process_group=): they need three independent global batches per step."
        )
    if grad_scaler is not None:
        raise ValueError(
            "grad_scaler is not supported in distributed mode (process_group=); train in full "
            "precision or with bfloat16 autocast, which needs no loss scaling."
        )
    return DistributedStep(group)
