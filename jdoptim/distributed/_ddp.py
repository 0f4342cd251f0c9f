"""Finding ``DistributedDataParallel`` wrappers: their process group, and turning their sync off.

The optimizer only sees parameters, so it learns about a DDP wrapper either from ``modules=`` or
by watching the module calls of the closure's forward pass (a global forward pre-hook, installed
only while ``torch.distributed`` is initialised).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_UNDECLARED_DDP = (
    "The closure ran a DistributedDataParallel model, but the optimizer has no process group: "
    "its Jacobian-descent step would only see this rank's losses and DDP would average "
    "per-rank directions. Pass process_group=model.process_group (or "
    "torch.distributed.group.WORLD) to the optimizer for a step that is exact on the global batch."
)


def ddp_process_group(modules: Iterable[nn.Module] | None) -> dist.ProcessGroup | None:
    """The process group of the first ``DistributedDataParallel`` among ``modules``, if any."""
    for module in modules or []:
        if isinstance(module, DistributedDataParallel):
            group: dist.ProcessGroup = module.process_group
            return group
    return None


@contextmanager
def watch_ddp(distributed: bool) -> Iterator[None]:
    """Context for the closure's forward pass.

    ``distributed=True``: every DDP wrapper called inside runs without gradient synchronisation,
    as under ``no_sync()``: the distributed step reduces the gradients itself, once.
    ``distributed=False``: a DDP wrapper called inside is an error (the step would be silently
    local), raised before its forward runs.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    silenced: dict[int, tuple[DistributedDataParallel, bool]] = {}

    def hook(module: nn.Module, args: Any) -> None:
        if not isinstance(module, DistributedDataParallel):
            return
        if not distributed:
            raise ValueError(_UNDECLARED_DDP)
        if id(module) not in silenced:
            silenced[id(module)] = (module, module.require_backward_grad_sync)
            module.require_backward_grad_sync = False

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for module, previous in silenced.values():
            module.require_backward_grad_sync = previous
