"""The distributed variant of a local path."""

from __future__ import annotations

import torch.distributed as dist

from jdoptim.distributed._gramian import DistributedGramianPath
from jdoptim.distributed._multi_task import DistributedMultiTaskPath
from jdoptim.distributed._path_base import DistributedPath
from jdoptim.distributed._rows import DistributedJacobianPath
from jdoptim.distributed._scalarizer import DistributedScalarizerPath
from jdoptim.paths import GramianPath, JacobianPath, MultiTaskPath, Path, ScalarizerPath

__all__ = ["DistributedPath", "distributed_variant"]


def distributed_variant(local: Path, group: dist.ProcessGroup) -> DistributedPath:
    """The distributed variant of ``local`` over ``group``."""
    if not dist.is_initialized():
        raise ValueError(
            "A distributed step needs torch.distributed to be initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment)."
        )
    variants: list[tuple[type[Path], type[DistributedPath]]] = [
        (GramianPath, DistributedGramianPath),
        (MultiTaskPath, DistributedMultiTaskPath),
        (ScalarizerPath, DistributedScalarizerPath),
        (JacobianPath, DistributedJacobianPath),
    ]
    for local_type, variant in variants:
        if isinstance(local, local_type):
            return variant(local, group)
    raise ValueError(
        f"Cross-Gramian weightings such as {local.module!r} are not supported in distributed "
        "steps: they need three independent global batches per step. Pass process_group=False "
        "for local steps on each rank."
    )
