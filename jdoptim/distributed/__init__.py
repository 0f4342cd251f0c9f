"""Distributed Jacobian descent on ``torch.distributed``, exact on the global batch.

An optimizer whose forward pass runs a ``DistributedDataParallel`` model (or that is given
``process_group=``) takes steps that see the losses of every rank, cross-rank Gramian blocks
included, and every rank ends the step with the same parameters. :func:`across_ranks` wraps a
local path (:mod:`jdoptim.paths`) into its distributed variant. See ``docs/distributed.md``.
"""

from jdoptim.distributed._across import RankAwarePath, across_ranks
from jdoptim.distributed._checkpoint import checkpoint_state, load_checkpoint_state
from jdoptim.distributed._communicator import Communicator, DistributedStepError
from jdoptim.distributed._ddp import ddp_process_group, watch_ddp
from jdoptim.distributed._fsdp import any_sharded

__all__ = [
    "Communicator",
    "DistributedStepError",
    "RankAwarePath",
    "across_ranks",
    "any_sharded",
    "checkpoint_state",
    "ddp_process_group",
    "load_checkpoint_state",
    "watch_ddp",
]
