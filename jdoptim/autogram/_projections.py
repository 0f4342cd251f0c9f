"""Linear projections inside a call without a closed form, found in the autograd graph.

Inside a call the engine has no rule for (``nn.MultiheadAttention``, a custom module calling
``F.linear``), a covered weight ``W`` used exactly once, as the right factor of a row-wise product
``Y = X Wᵀ (+ b)``, has the per-instance gradients of a ``Linear`` layer: ``Σₛ dYᵢₛ ⊗ Xᵢₛ`` (and
``Σₛ dYᵢₛ`` for ``b``). ``X`` is saved by the product's backward node, and ``dY`` comes out of the
Gramian pass's backward pass when the product's output is requested with the layer outputs; where
each instance's rows lie in ``Y`` is proven like for any layer output
(:mod:`jdoptim.autogram._structure`). So the call needs neither a replay nor per-instance backward
passes: for self-attention, the attention core is not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from jdoptim.autogram._records import CallRecord
from jdoptim.autogram._structure import Position, Proof
from jdoptim.autogram._terms import MaterializedTerm, OuterTerm, Term

# A call whose inside holds more autograd nodes than this is not searched (a recurrent layer
# unrolled over time uses its weights at every step, never once).
_MAX_NODES = 256


@dataclass
class Projection:
    """One product ``Y = X Wᵀ (+ b)`` of a call: its output edge, saved input and parameters."""

    edge: GradientEdge
    inputs: Tensor  # X, [R, d]
    weight: Tensor
    bias: Tensor | None
    # W's transpose and accumulator, b's accumulator and the views between the product and the
    # addition of b: each must be used by one operation only.
    leaves: list[Node]

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


def find_projections(record: CallRecord, params: list[Tensor]) -> list[Projection] | None:
    """The products inside ``record``'s call whose weight (and bias) are among ``params``, if
    together they hold every one of ``params``; ``None`` otherwise."""
    wanted = {id(p) for p in params}
    stops = {id(edge.node) for edge in record.input_edges}
    found: dict[int, Projection] = {}
    added: dict[int, tuple[Tensor, list[Node]]] = {}
    seen: set[int] = set()
    stack = [edge.node for edge in record.reached_outputs]
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_NODES:
            return None
        projection = _as_projection(node, wanted)
        if projection is not None:
            found[id(node)] = projection
        addition = _added_bias(node, wanted)
        if addition is not None:
            product, bias, leaves = addition
            added[id(product)] = (bias, leaves)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    for key, (bias, leaves) in added.items():
        projection = found.get(key)
        if (
            projection is None
            or projection.bias is not None
            or bias.shape != (projection.weight.shape[0],)
        ):
            return None
        projection.bias = bias
        projection.leaves += leaves
    held = [id(p) for projection in found.values() for p in projection.params]
    if sorted(held) != sorted(wanted):
        return None  # a parameter used another way, or twice
    return list(found.values())


def _as_projection(node: Node, wanted: set[int]) -> Projection | None:
    name = type(node).__name__
    if name == "AddmmBackward0":
        if node._saved_alpha != 1 or node._saved_beta != 1:  # type: ignore[attr-defined]
            return None
        bias_node, transpose = node.next_functions[0][0], node.next_functions[2][0]
        saved = "_saved_mat1"
    elif name == "MmBackward0":
        bias_node, transpose = None, node.next_functions[1][0]
        saved = "_saved_self"
    else:
        return None
    if transpose is None or type(transpose).__name__ != "TBackward0":
        return None
    accumulator = transpose.next_functions[0][0]
    weight = getattr(accumulator, "variable", None)
    if accumulator is None or weight is None or id(weight) not in wanted:
        return None
    leaves = [transpose, accumulator]
    bias = getattr(bias_node, "variable", None)
    if bias is not None and id(bias) in wanted and bias.shape == weight.shape[:1]:
        assert bias_node is not None
        leaves.append(bias_node)
    else:
        bias = None
    try:
        inputs = getattr(node, saved)
    except RuntimeError:  # modified in place since the forward pass
        return None
    if not isinstance(inputs, Tensor) or inputs.ndim != 2:
        return None
    return Projection(GradientEdge(node, 0), inputs.detach(), weight, bias, leaves)


_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def _added_bias(node: Node, wanted: set[int]) -> tuple[Node, Tensor, list[Node]] | None:
    """``(product, b, nodes)`` for ``view(product) + b`` with ``b`` broadcast along the last dim
    (``F.linear`` on a 3-d input: a 2-d product, a view back, then the bias)."""
    if type(node).__name__ != "AddBackward0" or node._saved_alpha != 1:  # type: ignore[attr-defined]
        return None
    (first, _), (second, _) = node.next_functions
    for chain, accumulator in ((first, second), (second, first)):
        bias = getattr(accumulator, "variable", None)
        if chain is None or accumulator is None or bias is None or id(bias) not in wanted:
            continue
        if bias.ndim != 1 or node._input_metadata[0].shape[-1] != bias.shape[0]:
            continue
        path: list[Node] = [accumulator]
        while chain is not None and type(chain).__name__ in _VIEWS:
            path.append(chain)
            chain = chain.next_functions[0][0]
        if chain is not None and type(chain).__name__ in ("MmBackward0", "AddmmBackward0"):
            return chain, bias, path
    return None


def usable(projection: Projection, proof: Proof, index: int) -> Position | None:
    """Where the instances' rows lie in the product's output, if the proof covers it and each of
    its parameters is used by this product only."""
    if not all(proof.used_once(leaf) for leaf in projection.leaves):
        return None
    position = proof.position(index, (projection.inputs.shape[0], projection.weight.shape[0]))
    if position is None or position[0] != 0:
        return None
    return position


def projection_terms(
    projection: Projection,
    gradient: Tensor,
    position: Position | None,
    batch: int,
    dtype: torch.dtype,
) -> list[tuple[Tensor, Term]]:
    """The weight's (and bias's) terms from the output gradients ``[T, R, k]``, whose rows hold
    the instances at ``position`` (dim 0, digit of stride ``inner``)."""
    assert position is not None and position[0] == 0
    tasks, rows, width = gradient.shape
    inner = position[1]
    outer = rows // (batch * inner)
    per_instance = (
        gradient.to(dtype)
        .reshape(tasks, outer, batch, inner, width)
        .transpose(1, 2)
        .reshape(tasks, batch, outer * inner, width)
    )
    inputs = (
        projection.inputs.to(dtype)
        .reshape(outer, batch, inner, -1)
        .transpose(0, 1)
        .reshape(batch, outer * inner, -1)
    )
    terms: list[tuple[Tensor, Term]] = [
        (projection.weight, OuterTerm(per_instance, inputs, tuple(projection.weight.shape)))
    ]
    if projection.bias is not None:
        sums = per_instance.sum(dim=2).transpose(0, 1).reshape(batch * tasks, width)
        terms.append((projection.bias, MaterializedTerm(sums, tuple(projection.bias.shape))))
    return terms
