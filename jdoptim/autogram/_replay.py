"""Per-instance gradients of an attention layer by replaying it one instance at a time.

The generic local route differentiates a call's graph once per instance, with the output gradient
masked to that instance: for a layer whose cost grows with the batch, that is ``B`` times the cost
of its backward pass on the whole batch. ``nn.MultiheadAttention`` is pure (without dropout) and
processes instances independently along a dim its ``batch_first`` flag names, so it can instead be
re-run on each instance alone under ``torch.func.vmap``, with a ``vjp`` per instance: about the
cost of one forward and backward pass of the layer. The result is the same per-instance gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from jdoptim.autogram._jacobian import without_vmap_fallback_warnings

_suspended = 0


@contextmanager
def hooks_suspended() -> Iterator[None]:
    """The engines' forward hooks ignore the module calls of a replay."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def hooks_are_suspended() -> bool:
    return _suspended > 0


def replay_inputs(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any | None:
    """What a replay of this call needs (detached inputs), or ``None`` if it cannot be replayed."""
    if type(module).forward is not nn.MultiheadAttention.forward:
        return None
    assert isinstance(module, nn.MultiheadAttention)
    if module.dropout > 0 and module.training:
        return None  # a replay would draw another dropout mask
    if not isinstance(output, tuple) or output[1] is not None:
        return None  # attention weights requested: a second output to differentiate
    leaves, spec = tree_flatten((args, kwargs))
    copies: dict[int, Tensor] = {}  # one detached copy per tensor: self-attention stays visible
    detached = [
        copies.setdefault(id(leaf), leaf.detach()) if isinstance(leaf, Tensor) else leaf
        for leaf in leaves
    ]
    return tree_unflatten(detached, spec)


def _batch_dims(module: nn.MultiheadAttention, args: Any, kwargs: Any) -> list[int | None] | None:
    """Per flattened input leaf, the dim holding instances (``None``: shared); ``None`` if unknown."""
    names = ["query", "key", "value", "key_padding_mask"]
    named = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    sequence_dim = 0 if module.batch_first else 1
    dims: dict[int, int] = {}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            continue
        if name == "key_padding_mask":
            if value.ndim != 2:
                return None
            dims[id(value)] = 0
        else:
            if value.ndim != 3:
                return None  # unbatched inputs
            dims[id(value)] = sequence_dim
    attn_mask = kwargs.get("attn_mask", args[5] if len(args) > 5 else None)
    if isinstance(attn_mask, Tensor) and attn_mask.ndim != 2:
        return None  # per-instance-and-head masks are interleaved with the heads
    leaves, _ = tree_flatten((args, kwargs))
    return [dims.get(id(leaf)) if isinstance(leaf, Tensor) else None for leaf in leaves]


def replay_rows(
    module: nn.Module,
    params: list[Tensor],
    inputs: Any,
    gradient: Tensor,
    output_dim: int,
    batch: int,
) -> list[Tensor] | None:
    """Per-instance, per-task gradients ``[B, T, *p.shape]`` of ``params`` (``None``: not possible).

    ``gradient`` is ``[T, *y.shape]``, the tasks' gradients at the call's only output ``y``, whose
    instances lie along ``output_dim``.
    """
    assert isinstance(module, nn.MultiheadAttention)
    args, kwargs = inputs
    dims = _batch_dims(module, args, kwargs)
    expected_dim = 0 if module.batch_first else 1
    if dims is None or output_dim != expected_dim:
        return None
    names = {id(p): name for name, p in module.named_parameters()}
    if any(id(p) not in names for p in params):
        return None
    leaves, spec = tree_flatten((args, kwargs))
    batched = [i for i, dim in enumerate(dims) if dim is not None]
    if any(leaves[i].shape[dims[i]] != batch for i in batched):
        return None
    primals = {f"module.{names[id(p)]}": p.detach() for p in params}
    forward_only = _ForwardOnly(module)

    def one_instance(slices: list[Tensor], cotangent: Tensor) -> dict[str, Tensor]:
        instance_leaves = list(leaves)
        for i, piece in zip(batched, slices, strict=True):
            instance_leaves[i] = piece.unsqueeze(dims[i])  # type: ignore[arg-type]
        call_args, call_kwargs = tree_unflatten(instance_leaves, spec)

        def attention(values: dict[str, Tensor]) -> Tensor:
            out: Tensor = functional_call(forward_only, values, tuple(call_args), call_kwargs)[0]
            return out

        pullback = vjp(attention, primals)[1]  # vjp returns (output, pullback)
        grads: dict[str, Tensor] = vmap(pullback)(cotangent.unsqueeze(1 + output_dim))[0]
        return grads

    in_dims = ([dims[i] for i in batched], 1 + output_dim)
    with hooks_suspended(), torch.enable_grad(), without_vmap_fallback_warnings():
        grads = vmap(one_instance, in_dims=in_dims)([leaves[i] for i in batched], gradient)
    return [grads[f"module.{names[id(p)]}"] for p in params]


class _ForwardOnly(nn.Module):
    """Calls the wrapped module's ``forward`` alone: the replay recomputes what the module's
    forward made of the inputs it was called with (its pre-hooks had run); running the user's hooks
    again would change the values (an output hook) or fail under ``vmap`` (a hook that logs with
    ``.item()``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.forward(*args, **kwargs)
