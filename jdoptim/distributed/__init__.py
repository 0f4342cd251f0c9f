"""Distributed Jacobian descent on ``torch.distributed``, exact on the global batch.

Pass ``process_group=`` to an optimizer (``JDSGD(..., process_group=dist.group.WORLD)``, or
``modules=ddp_model``): each step then sees the losses of every rank, cross-rank Gramian blocks
included, and every rank ends the step with the same parameters. See ``docs/distributed.md``.
"""

from jdoptim.distributed._communicator import Communicator, DistributedStepError
from jdoptim.distributed._ddp import ddp_process_group, watch_ddp
from jdoptim.distributed._setup import distributed_step_for
from jdoptim.distributed._step import DistributedStep

__all__ = [
    "Communicator",
    "DistributedStep",
    "DistributedStepError",
    "ddp_process_group",
    "distributed_step_for",
    "watch_ddp",
]
