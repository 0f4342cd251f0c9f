"""What the engine's forward hooks save about each call of a covered module.

A :class:`CallRecord` is stored in the metadata of the autograd nodes that produced the call's
outputs, never in the engine: it lives exactly as long as the graph it describes, so forwards whose
Gramian is never computed leak nothing. It holds no reference to its own output nodes (that would be
a reference cycle through C++ that the garbage collector cannot see).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils._pytree import tree_leaves

from jdoptim.autogram._replay import replay_inputs
from jdoptim.autogram._rules import ClosedFormRule

METADATA_KEY = "jdoptim.autogram"


@dataclass(eq=False)
class CallRecord:
    """One forward call of a module that directly owns covered parameters.

    ``rule`` is the closed form of the module type (``None``: a generic module).
    ``x`` is the detached first input, saved for closed-form rules only. ``input_edges`` are the
    gradient edges of every input tensor that requires grad: where the call's local graph ends.
    ``replay`` holds the detached inputs of a call that can be replayed per instance.
    ``params`` are the module's direct parameters during the call: a module may hold other tensors
    by the time its Gramian is computed (``fully_shard`` swaps its sharded parameters back in).
    """

    module: nn.Module
    rule: ClosedFormRule | None
    x: Tensor | None
    x_version: int
    input_edges: list[GradientEdge]
    mixes_instances: bool
    half_precision: bool = False
    replay: Any = None
    params: dict[str, Tensor] = field(default_factory=dict)
    reached_outputs: list[GradientEdge] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)


def mixes_instances(module: nn.Module) -> bool:
    """Whether ``module`` combines the instances of a batch (batch statistics in BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    return False


def record_call(
    module: nn.Module, rule: ClosedFormRule | None, args: Any, kwargs: Any, output: Any
) -> None:
    """Attaches a :class:`CallRecord` of this call to the nodes that produced its outputs."""
    if not torch.is_grad_enabled():
        return
    outputs = [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.requires_grad]
    if not outputs:
        return
    inputs = (args, kwargs)
    input_tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.requires_grad]
    input_edges = [get_gradient_edge(t) for t in input_tensors]
    first = next((t for t in tree_leaves(inputs) if isinstance(t, Tensor)), None)
    keep_x = rule is not None and first is not None
    record = CallRecord(
        module=module,
        rule=rule,
        x=first.detach() if keep_x and first is not None else None,
        x_version=first._version if keep_x and first is not None else 0,
        input_edges=input_edges,
        mixes_instances=mixes_instances(module),
        half_precision=any(t.dtype == torch.float16 for t in outputs),
        replay=replay_inputs(module, args, kwargs, output) if rule is None else None,
        params=dict(module.named_parameters(recurse=False)),
    )
    own_inputs = {(id(e.node), e.output_nr) for e in input_edges}
    for tensor in outputs:
        edge = get_gradient_edge(tensor)
        if (id(edge.node), edge.output_nr) in own_inputs:
            continue  # an input passed through unchanged is not produced by this call
        entries: list[tuple[CallRecord, int, tuple[int, ...]]] = _metadata(edge.node).setdefault(
            METADATA_KEY, []
        )
        entries.append((record, edge.output_nr, tuple(tensor.shape)))


def records_at(node: Node) -> list[tuple[CallRecord, int, tuple[int, ...]]]:
    """The ``(record, output_nr, output shape)`` entries stored on ``node`` (innermost call first)."""
    metadata = _metadata(node)
    if METADATA_KEY not in metadata:
        return []
    entries: list[tuple[CallRecord, int, tuple[int, ...]]] = metadata[METADATA_KEY]
    return entries


def _metadata(node: Node) -> dict[str, Any]:
    # ``Node.metadata`` is a property at runtime, declared as a method in torch's stubs.
    metadata: dict[str, Any] = getattr(node, "metadata")  # noqa: B009
    return metadata
