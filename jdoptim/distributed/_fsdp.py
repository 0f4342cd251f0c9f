"""FSDP2 (``fully_shard``) models: finding them, their unsharded parameters, sharded gradients.

Under ``fully_shard`` each parameter the optimizer holds is a sharded ``DTensor`` (dim 0 split
over the ranks of a 1-D device mesh); for a layer's forward and backward FSDP2 all-gathers it into
an *unsharded* parameter, a plain tensor object that FSDP2 keeps for the life of the model (only
its storage is freed). The autograd graph and the engine's hooks see that unsharded parameter, so
the engine covers the unsharded parameters, and gradients are written to the sharded parameters
after a reduce-scatter.

FSDP2 keeps no public listing of its unsharded parameters: :meth:`ShardedModel.gather` finds them
with public calls only (``unshard``, then the modules' own parameters, then ``reshard``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def fsdp_root(modules: Iterable[nn.Module] | None) -> nn.Module | None:
    """The first ``fully_shard`` module among ``modules``, if any."""
    for module in modules or []:
        if is_fsdp(module):
            return module
    return None


@contextmanager
def watch_fsdp(on_fsdp: Callable[[nn.Module], None]) -> Iterator[None]:
    """Context for forward passes: reports the outermost ``fully_shard`` module each one runs."""
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return

    def hook(module: nn.Module, args: Any) -> None:
        if is_fsdp(module):
            on_fsdp(module)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ShardedModel:
    """A ``fully_shard`` model as the distributed step sees it.

    ``root`` is the outermost ``fully_shard`` module; every ``fully_shard`` module under it (the
    usual recipe shards each layer, then the root) belongs to the model.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.modules = [m for m in root.modules() if is_fsdp(m)]
        sharded = [p for p in root.parameters() if isinstance(p, DTensor)]
        if not sharded:
            raise ValueError(f"{type(root).__name__} holds no sharded parameter.")
        mesh = sharded[0].device_mesh
        if mesh.ndim != 1:
            raise ValueError(
                "Jacobian descent under fully_shard supports a 1-D device mesh (plain FSDP), got a "
                f"{mesh.ndim}-D mesh (HSDP or tensor parallelism)."
            )
        self.group: dist.ProcessGroup = mesh.get_group()
        self.world_size = dist.get_world_size(self.group)
        self._params: list[tuple[Tensor, DTensor, int]] = []
        modules = list(self.modules)

        def reshard_after_evaluation(module: nn.Module, args: Any, output: Any) -> None:
            # Kept gathered for a step's Gramian pass, but a forward without gradients is no step.
            if not torch.is_grad_enabled():
                for fsdp_module in modules:
                    fsdp_module.reshard()  # type: ignore[operator]

        root.register_forward_hook(reshard_after_evaluation)

    def keep_unsharded(self) -> None:
        """Each layer keeps its gathered parameters from its forward until :meth:`reshard`.

        The engine reads a layer's parameters after the whole forward pass (which parameters it
        owns, and, for layers without a closed-form rule, their values), as under
        ``fully_shard(reshard_after_forward=False)``.
        """
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            module.set_reshard_after_backward(False, recurse=False)  # type: ignore[operator]

    def gather(self) -> None:
        """Learns FSDP2's unsharded parameters: each layer is gathered once, read, then freed.

        While a ``fully_shard`` module is gathered, its modules hold the unsharded parameters,
        tensor objects FSDP2 keeps for the life of the model (only their storage is freed); the
        autograd graph and the engine see those. Called before the first forward pass.
        """
        params: list[tuple[Tensor, DTensor, int]] = []
        seen: set[int] = set()
        for layer, module in enumerate(self.modules):
            owned = [
                (owner, name, param)
                for owner in _own_modules(module)
                for name, param in owner.named_parameters(recurse=False)
                if isinstance(param, DTensor) and id(param) not in seen
            ]
            module.unshard()  # type: ignore[operator]
            for owner, name, sharded in owned:
                seen.add(id(sharded))
                params.append((getattr(owner, name), sharded, layer))
            module.reshard()  # type: ignore[operator]
        self._params = params

    def reshard(self) -> None:
        """Frees every gathered parameter (the next forward gathers the updated shards)."""
        for module in self.modules:
            module.reshard()  # type: ignore[operator]

    def pairs(self) -> list[tuple[Tensor, DTensor]]:
        """``(unsharded, sharded)`` for every parameter, model order (after :meth:`gather`)."""
        return [(unsharded, sharded) for unsharded, sharded, _ in self._params]

    def params(self) -> list[tuple[Tensor, DTensor, int]]:
        """``(unsharded, sharded, layer)``: ``layer`` numbers the ``fully_shard`` modules, whose
        parameters' gradients travel in one collective."""
        return list(self._params)


def _own_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` and its descendants, except those of nested ``fully_shard`` modules."""
    own, stack = [], [module]
    while stack:
        current = stack.pop()
        own.append(current)
        stack.extend(reversed([c for c in current.children() if not is_fsdp(c)]))
    return own


def sharded_rows(
    fulls: list[Tensor], shardeds: list[DTensor], group: dist.ProcessGroup
) -> list[Tensor]:
    """This rank's rows (dim 0) of the sum over ranks of each of ``fulls``: one reduce-scatter.

    FSDP2 splits dim 0 into chunks of ``ceil(d0 / R)`` rows, rank order, the last ones possibly
    shorter or empty; each tensor is zero-padded to ``R`` whole chunks, and rank ``r``'s chunks of
    every tensor travel side by side.
    """
    world = dist.get_world_size(group)
    dtype = fulls[0].dtype
    pieces = []
    for full in fulls:
        chunk = math.ceil(full.shape[0] / world)
        padded = full.new_zeros((chunk * world, *full.shape[1:]), dtype=dtype)
        padded[: full.shape[0]] = full
        pieces.append(padded.reshape(world, -1))
    flat = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    out = flat.new_empty(flat.shape[1])
    dist.reduce_scatter_single(out, flat.reshape(-1), group=group)
    rows = []
    for full, sharded, piece in zip(
        fulls, shardeds, torch.split(out, [p.shape[1] for p in pieces]), strict=True
    ):
        local = piece.reshape(-1, *full.shape[1:])[: sharded.to_local().shape[0]]
        rows.append(local.to(full.dtype))
    return rows


def as_sharded(local: Tensor, sharded: DTensor) -> DTensor:
    """``local`` (this rank's rows) as a gradient for the sharded parameter ``sharded``."""
    return DTensor.from_local(
        local.to(sharded.dtype).contiguous(),
        sharded.device_mesh,
        sharded.placements,
        run_check=False,
        shape=sharded.shape,
        stride=sharded.stride(),
    )
