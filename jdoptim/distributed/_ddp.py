"""Finding ``DistributedDataParallel`` wrappers: their process group, and turning their sync off.

The optimizer only sees parameters, so it learns about a DDP wrapper either from ``modules=`` or
by watching the module calls of the closure's forward pass (a global forward pre-hook, installed
only while ``torch.distributed`` is initialised).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim._global_hooks import guarded, remove_deferred_hooks, remove_hook


def ddp_process_group(modules: Iterable[nn.Module] | None) -> dist.ProcessGroup | None:
    """The process group of the first ``DistributedDataParallel`` among ``modules``, if any."""
    for module in modules or []:
        if isinstance(module, DistributedDataParallel):
            group: dist.ProcessGroup = module.process_group
            return group
    return None


@contextmanager
def watch_ddp(
    on_ddp: Callable[[dist.ProcessGroup], None],
    silence: bool = True,
    concerns: Callable[[DistributedDataParallel], bool] | None = None,
) -> Iterator[None]:
    """Context for a forward pass: reports each ``DistributedDataParallel`` model it runs.

    ``on_ddp(process_group)`` is called before the model's forward; the model then runs without
    its own gradient synchronisation, as under ``no_sync()``: the distributed step reduces the
    gradients itself, once. With ``concerns``, only the models it accepts (those whose
    parameters the optimizer trains): another DDP model in the process (a GAN's other network,
    trained by a torch optimizer) keeps its own synchronisation. Does nothing unless
    ``torch.distributed`` is initialised.
    """
    remove_deferred_hooks()
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    silenced: dict[int, tuple[DistributedDataParallel, bool]] = {}
    # Per model: whether its last forward ran with gradients (a training forward).
    trained: dict[int, bool] = {}

    def hook(module: nn.Module, args: Any) -> None:
        if not isinstance(module, DistributedDataParallel):
            return
        if concerns is not None and not concerns(module):
            return
        if getattr(module, "static_graph", False):
            # Its reducer then asserts on any backward pass it did not prepare (an internal error
            # of torch's, raised on every rank), and the steps never use its gradient sync.
            raise ValueError(
                "DistributedDataParallel(static_graph=True) cannot run jdoptim's steps: they "
                "differentiate the losses and reduce the gradients themselves, outside DDP's "
                "reducer, which in static-graph mode rejects such backward passes. Build the "
                "model with DistributedDataParallel(model) (static_graph=False); each step stays "
                "exact on the global batch."
            )
        on_ddp(module.process_group)
        if silence:
            if id(module) not in silenced:
                silenced[id(module)] = (module, module.require_backward_grad_sync)
            # At every forward: leaving a no_sync() block turns the synchronisation back on.
            module.require_backward_grad_sync = False
            # A synchronised DDP model broadcasts rank 0's buffers (BatchNorm's running
            # statistics) at the forward after a training forward; silenced, its post-forward
            # turned that off, and the ranks' buffers drifted apart: as a synchronised one.
            if id(module) in trained:
                module.require_forward_param_sync = trained[id(module)]
            trained[id(module)] = torch.is_grad_enabled()

    registered, turn_off = guarded(hook)
    handle = nn.modules.module.register_module_forward_pre_hook(registered)
    try:
        yield
    finally:
        turn_off()
        remove_hook(handle)
        for module, previous in silenced.values():
            module.require_backward_grad_sync = previous
            module.require_forward_param_sync = previous and trained.get(id(module), True)
