"""Linear projections inside a call without a closed form, found in the autograd graph.

Inside a call the engine has no rule for (``nn.MultiheadAttention``, a recurrent layer, a custom
module calling ``F.linear``), a covered weight ``W`` used only as the right factor of row-wise
products ``Yᵤ = Xᵤ Wᵀ (+ b)`` has the per-instance gradients of a ``Linear`` layer whose positions
are all the rows of all those products: ``Σᵤ Σₛ dYᵤᵢₛ ⊗ Xᵤᵢₛ`` (and ``Σᵤ Σₛ dYᵤᵢₛ`` for ``b``).
Each ``Xᵤ`` is saved by its product's backward node, and each ``dYᵤ`` comes out of the Gramian
pass's backward pass when the products' outputs are requested with the layer outputs; where each
instance's rows lie in ``Yᵤ`` is proven like for any layer output
(:mod:`jdoptim.autogram._structure`), and so is that nothing else uses ``W`` or ``b``. So the call
needs neither a replay nor per-instance backward passes: self-attention does not recompute its
core, a GRU unrolled over 32 steps is 32 products per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from jdoptim.autogram._records import CallRecord
from jdoptim.autogram._structure import Position, Proof
from jdoptim.autogram._terms import MaterializedTerm, OuterTerm, Term

_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


@dataclass
class Projection:
    """One product ``Y = X Wᵀ (+ b)`` of a call: its output edge, saved input and parameters."""

    edge: GradientEdge
    inputs: Tensor  # X, [R, d]
    weight: Tensor
    weight_node: Node  # W's accumulator, shared by every product of W
    bias: Tensor | None = None
    bias_node: Node | None = None
    # W's transpose, and the views between the product and an addition of b: used by this
    # product only.
    private: list[Node] = field(default_factory=list)

    @property
    def rows(self) -> tuple[int, int]:
        """The shape of the product's output ``[R, k]``."""
        return (self.inputs.shape[0], self.weight.shape[0])


def find_projections(record: CallRecord, params: list[Tensor]) -> list[Projection] | None:
    """The products inside ``record``'s call whose weight (and bias) are among ``params``, if
    together they hold every one of ``params``; ``None`` otherwise."""
    wanted = {id(p) for p in params}
    stops = {id(edge.node) for edge in record.input_edges}
    found: dict[int, Projection] = {}
    added: dict[int, tuple[Tensor, Node, list[Node]]] = {}
    # The nodes themselves, not their ids: a node's Python object lives only while referenced,
    # and a later object may reuse a freed id.
    seen: set[Node] = set()
    stack = [edge.node for edge in record.reached_outputs]
    while stack:
        node = stack.pop()
        if node in seen or id(node) in stops:
            continue
        seen.add(node)
        projection = _as_projection(node, wanted)
        if projection is not None:
            found[id(node)] = projection
        addition = _added_bias(node, wanted)
        if addition is not None:
            product, bias, accumulator, views = addition
            added[id(product)] = (bias, accumulator, views)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    for key, (bias, accumulator, views) in added.items():
        projection = found.get(key)
        if projection is None or projection.bias is not None:
            return None
        if bias.shape != projection.weight.shape[:1]:
            return None
        projection.bias, projection.bias_node = bias, accumulator
        projection.private += views
    held = {id(p.weight) for p in found.values()} | {
        id(p.bias) for p in found.values() if p.bias is not None
    }
    if held != wanted:
        return None  # a parameter used another way
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
    try:
        inputs = getattr(node, saved)
    except RuntimeError:  # modified in place since the forward pass
        return None
    if not isinstance(inputs, Tensor) or inputs.ndim != 2:
        return None
    projection = Projection(GradientEdge(node, 0), inputs.detach(), weight, accumulator)
    projection.private.append(transpose)
    bias = getattr(bias_node, "variable", None)
    if bias is not None and id(bias) in wanted and bias.shape == weight.shape[:1]:
        projection.bias, projection.bias_node = bias, bias_node
    return projection


def _added_bias(node: Node, wanted: set[int]) -> tuple[Node, Tensor, Node, list[Node]] | None:
    """``(product, b, b's accumulator, views)`` for ``view(product) + b``, ``b`` broadcast along the
    last dim (``F.linear`` on a 3-d input: a 2-d product, a view back, then the bias)."""
    if type(node).__name__ != "AddBackward0" or node._saved_alpha != 1:  # type: ignore[attr-defined]
        return None
    (first, _), (second, _) = node.next_functions
    for chain, accumulator in ((first, second), (second, first)):
        bias = getattr(accumulator, "variable", None)
        if chain is None or accumulator is None or bias is None or id(bias) not in wanted:
            continue
        if bias.ndim != 1 or node._input_metadata[0].shape[-1] != bias.shape[0]:
            continue
        views: list[Node] = []
        while chain is not None and type(chain).__name__ in _VIEWS:
            views.append(chain)
            chain = chain.next_functions[0][0]
        if chain is not None and type(chain).__name__ in ("MmBackward0", "AddmmBackward0"):
            return chain, bias, accumulator, views
    return None


def usable(projections: list[Projection], proof: Proof, first: int) -> list[Position] | None:
    """Where the instances' rows lie in each product's output (edge ``first + k`` of the proof),
    if the proof covers them all and no operation but these products uses their parameters."""
    uses: dict[int, int] = {}
    for projection in projections:
        for node in (projection.weight_node, projection.bias_node):
            if node is not None:
                uses[id(node)] = uses.get(id(node), 0) + 1
    shared = [p.weight_node for p in projections] + [
        p.bias_node for p in projections if p.bias_node is not None
    ]
    if any(proof.consumers.get(id(node), 0) != uses[id(node)] for node in shared):
        return None
    if not all(proof.used_once(node) for p in projections for node in p.private):
        return None
    positions = []
    for k, projection in enumerate(projections):
        position = proof.position(first + k, projection.rows)
        if position is None or position[0] != 0:
            return None
        positions.append(position)
    return positions


def projection_terms(
    projections: list[Projection],
    gradients: list[Tensor],
    positions: list[Position],
    batch: int,
    dtype: torch.dtype,
) -> list[tuple[Tensor, Term]]:
    """Each weight's and bias's term, from the products' output gradients ``[T, R, k]`` whose rows
    hold the instances at ``positions`` (dim 0, digit of stride ``inner``)."""
    weights: dict[int, tuple[Tensor, list[Tensor], list[Tensor]]] = {}
    biases: dict[int, tuple[Tensor, list[Tensor]]] = {}
    for projection, gradient, (_, inner) in zip(projections, gradients, positions, strict=True):
        tasks, rows, width = gradient.shape
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
        _, outputs_of, inputs_of = weights.setdefault(
            id(projection.weight), (projection.weight, [], [])
        )
        outputs_of.append(per_instance)
        inputs_of.append(inputs)
        if projection.bias is not None:
            _, sums = biases.setdefault(id(projection.bias), (projection.bias, []))
            sums.append(per_instance.sum(dim=2))  # [T, B, k]
    terms: list[tuple[Tensor, Term]] = []
    for weight, outputs_of, inputs_of in weights.values():
        a, b = _joined(outputs_of, dim=2), _joined(inputs_of, dim=1)
        terms.append((weight, OuterTerm(a, b, tuple(weight.shape))))
    for bias, sums in biases.values():
        total = sums[0] if len(sums) == 1 else torch.stack(sums).sum(dim=0)
        per_row = total.transpose(0, 1).reshape(-1, total.shape[-1])  # instance-major rows
        terms.append((bias, MaterializedTerm(per_row, tuple(bias.shape))))
    return terms


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    """The positions of every product of one weight, side by side."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
