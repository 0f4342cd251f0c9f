"""FSDP2 (``fully_shard``) models: finding them, their unsharded parameters, sharded gradients.

Under ``fully_shard`` each parameter the optimizer holds is a sharded ``DTensor`` (dim 0 split
over the ranks of a 1-D device mesh); for a layer's forward and backward FSDP2 all-gathers it into
an *unsharded* parameter, a plain tensor object that FSDP2 keeps for the life of the model (only
its storage is freed). The autograd graph and the engine's hooks see that unsharded parameter, so
the engine covers the unsharded parameters, and gradients are written to the sharded parameters
after a reduce-scatter.

FSDP2 keeps no public listing of its unsharded parameters: :meth:`ShardedModel.gather` finds them
with public calls only (``unshard``, then the modules' own parameters, then ``reshard``).

**Gathering in step.** FSDP2 reshards each layer after its forward and gathers it again when a
backward pass reaches it. The step's backward passes are the engine's, and how many it runs, and
through which layers, depends on each rank's data (its batch size, the independence probe, the
routes); so during them FSDP2 does not gather (``set_unshard_in_backward(False)``), and each
gather goes through :class:`ShardedModel` instead, in *rounds* that every rank runs alike. A rank
whose pass needs a layer (autograd unpacks a tensor saved from that layer's parameters) starts a
round: one all-reduce of ``L + 1`` integers, each rank's request, or its "done"; then every rank
frees what it holds and gathers each requested layer, in layer order, keeping the one it asked
for. A rank whose passes are over keeps answering rounds until every rank is done. So every
rank's collectives are the same sequence, whatever passes each one runs, and a rank holds at most
one layer's unsharded parameters at a time during the passes (two while one is requested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from jdoptim._global_hooks import guarded, remove_deferred_hooks, remove_hook


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
    remove_deferred_hooks()
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return

    def hook(module: nn.Module, args: Any) -> None:
        if is_fsdp(module):
            on_fsdp(module)

    registered, turn_off = guarded(hook)
    handle = nn.modules.module.register_module_forward_pre_hook(registered)
    try:
        yield
    finally:
        turn_off()
        remove_hook(handle)


def sharded_model(root: nn.Module) -> tuple[ShardedModel, bool]:
    """The :class:`ShardedModel` of ``root`` (one per model, shared by its optimizers: its hooks
    are on the model), and whether this call created it."""
    model = root.__dict__.get(_ATTRIBUTE)
    if isinstance(model, ShardedModel):
        return model, False
    model = ShardedModel(root)
    root.__dict__[_ATTRIBUTE] = model  # on the model, not in a global table: it dies with it
    return model, True


class ShardedModel:
    """A ``fully_shard`` model as the distributed step sees it.

    ``root`` is the outermost ``fully_shard`` module; every ``fully_shard`` module under it (the
    usual recipe shards each layer, then the root) belongs to the model. Its layers are resharded
    as FSDP2 is told (after each forward by default); during the step's backward passes they are
    gathered in rounds (see the module docstring).
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
        # NCCL only moves CUDA tensors: the round's integers live where the backend wants.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(self.group) == "nccl"
            else torch.device("cpu")
        )
        self._params: list[tuple[Tensor, DTensor, int]] = []
        self._layers: list[list[Tensor]] = [[] for _ in self.modules]
        self._in_passes = False
        self.rounds = 0  # rounds run, and layers gathered in them, since the counts were zeroed
        self.gathers = 0
        self.gathered_bytes = 0
        modules = list(self.modules)

        def reshard_after_evaluation(module: nn.Module, args: Any, output: Any) -> None:
            # A forward without gradients is no step: nothing of it is needed afterwards.
            if not torch.is_grad_enabled():
                for fsdp_module in modules:
                    fsdp_module.reshard()  # type: ignore[operator]

        root.register_forward_hook(reshard_after_evaluation)
        self._hooks: list[list[Any]] = [[] for _ in self.modules]
        for layer, module in enumerate(self.modules):
            hooks = self._hooks[layer]
            # Before FSDP2's own pre-forward hook: a forward run again inside a pass (activation
            # checkpointing) finds the layer gathered in a round, and FSDP2 gathers nothing.
            module.register_forward_pre_hook(partial(self._enter_layer, layer, hooks), prepend=True)
            module.register_forward_hook(partial(self._leave_layer, hooks), always_call=True)

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
        self._layers = [
            [u for u, _, owner in params if owner == layer] for layer in range(len(self.modules))
        ]

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

    # --- gathering in rounds during the step's backward passes -------------------------------------

    def begin_passes(self) -> None:
        """From now until :meth:`finish_passes`, layers are gathered in rounds, not by FSDP2."""
        for module in self.modules:
            module.set_unshard_in_backward(False)  # type: ignore[operator]
        self._in_passes = True

    def finish_passes(self) -> None:
        """Answers rounds until every rank's passes are over; then frees every layer.

        Every rank calls it once after its passes, whether they ran, failed or never started.
        """
        try:
            while not self._round(None):
                pass
        finally:
            self._in_passes = False
            for module in self.modules:
                module.set_unshard_in_backward(True)  # type: ignore[operator]
            self.reshard()

    def holds(self, layer: int) -> bool:
        """Whether this rank holds layer ``layer``'s unsharded parameters now."""
        return all(p.untyped_storage().nbytes() > 0 for p in self._layers[layer] if p.numel())

    def _need(self, layer: int) -> None:
        if self._in_passes and not self.holds(layer):
            self._round(layer)

    def _round(self, requested: int | None) -> bool:
        """One round (see the module docstring); whether every rank is done."""
        count = len(self.modules)
        flags = torch.zeros(count + 1, dtype=torch.int64, device=self.device)
        flags[count if requested is None else requested] = 1
        dist.all_reduce(flags, group=self.group)
        self.rounds += 1
        wanted = flags.tolist()
        if wanted[count] == self.world_size:
            return True
        self.reshard()
        for layer, requests in enumerate(wanted[:count]):
            if not requests:
                continue
            module = self.modules[layer]
            module.set_unshard_in_backward(True)  # type: ignore[operator]
            try:
                module.unshard()  # type: ignore[operator]
            finally:
                module.set_unshard_in_backward(False)  # type: ignore[operator]
            self.gathers += 1
            self.gathered_bytes += sum(p.numel() * p.element_size() for p in self._layers[layer])
            if layer != requested:
                module.reshard()  # type: ignore[operator]
        return False

    def enter_call_in_progress(self) -> None:
        """For a model found by its root's forward pre-hook: that call's hooks were fixed before
        this model's own were added, so its tagging starts here."""
        self._enter_layer(0, self._hooks[0], self.root, ())

    def _enter_layer(self, layer: int, hooks: list[Any], module: nn.Module, args: Any) -> None:
        """Tags the tensors autograd saves from this layer's (gathered) parameters."""
        if not torch.is_grad_enabled():
            return
        if self._in_passes:
            self._need(layer)
        storages: set[int] = set()

        def pack(tensor: Tensor) -> tuple[Tensor, int]:
            if not storages:  # the layer is gathered by now: its storages are fixed until then
                storages.update(_storage(p) for p in self._layers[layer] if p.numel())
                storages.discard(0)
            return tensor, layer if _storage(tensor) in storages else -1

        def unpack(packed: tuple[Tensor, int]) -> Tensor:
            tensor, owner = packed
            if owner >= 0:
                self._need(owner)
            return tensor

        context = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        context.__enter__()
        hooks.append(context)

    def _leave_layer(self, hooks: list[Any], module: nn.Module, args: Any, output: Any) -> None:
        if hooks:
            hooks.pop().__exit__(None, None, None)


_ATTRIBUTE = "_jdoptim_sharded_model"


def _storage(tensor: Tensor) -> int:
    """The address of ``tensor``'s storage (0 for a tensor subclass without one)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


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


def any_sharded(params: Iterable[Tensor]) -> bool:
    """Whether some of ``params`` are sharded (``fully_shard``: ``DTensor`` parameters). Their
    losses' graph then reaches the unsharded copies of the forward pass, not these tensors."""
    return any(isinstance(param, DTensor) for param in params)


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
