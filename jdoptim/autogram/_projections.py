"""Parameters inside a call without a closed form whose per-instance gradients one backward pass
gives, found in the autograd graph.

Inside a call the engine has no rule for (``nn.MultiheadAttention``, a recurrent layer, a module
with parameters of its own such as a ViT's class token and position table, a custom module calling
``F.linear``), two uses of a covered parameter are enough:

- a weight ``W`` used as the right factor of row-wise products ``Yᵤ = Xᵤ Wᵀ (+ b)`` has the
  per-instance gradients of a ``Linear`` layer whose positions are all the rows of all those
  products: ``Σᵤ Σₛ dYᵤᵢₛ ⊗ Xᵤᵢₛ`` (and ``Σᵤ Σₛ dYᵤᵢₛ`` for ``b``), each ``Xᵤ`` saved by its
  product's backward node;
- a parameter ``P`` shared by the instances, added to an activation (``Y = Z + P``), expanded into
  one (``E = P.expand(...)``) or scaling one (``Y = Z * P``: a layer scale, the weight of an RMS
  norm), has as instance ``i``'s gradient slice ``i`` of ``dY`` (``dE``; ``dY * Z``) summed to
  ``P``'s shape.

Each ``dY`` comes out of the Gramian pass's backward pass when these outputs are requested with the
layer outputs; where each instance lies in them is proven like for any layer output
(:mod:`jdoptim.autogram._structure`), and so is that nothing else uses the parameters. So the call
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
from jdoptim.autogram._terms import BiasTerm, OuterTerm, Term

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


@dataclass
class Broadcast:
    """A parameter shared by every instance in an activation: ``Y = Z + P``, ``E = P.expand()``,
    or ``Y = Z * P`` (then ``factor`` is ``Z``, saved by the product)."""

    edge: GradientEdge  # Y or E
    shape: tuple[int, ...]  # its shape
    param: Tensor
    param_node: Node  # P's accumulator
    factor: Tensor | None = None


Use = Projection | Broadcast


def find_projections(record: CallRecord, params: list[Tensor]) -> list[Use] | None:
    """The products and broadcasts inside ``record``'s call that use ``params``, if together they
    hold every one of ``params``; ``None`` otherwise."""
    wanted = {id(p) for p in params}
    stops = {id(edge.node) for edge in record.input_edges}
    # Keyed by the nodes themselves, not their ids: a node's Python object lives only while
    # referenced, and a later object may reuse a freed id.
    found: dict[Node, Projection] = {}
    added: dict[Node, tuple[Tensor, Node, list[Node]]] = {}
    broadcasts: list[Broadcast] = []
    seen: set[Node] = set()
    stack = [edge.node for edge in record.reached_outputs]
    while stack:
        node = stack.pop()
        if node in seen or id(node) in stops:
            continue
        seen.add(node)
        projection = _as_projection(node, wanted)
        if projection is not None:
            found[node] = projection
        addition = _added_bias(node, wanted)
        if addition is not None:
            product, bias, accumulator, views = addition
            added[product] = (bias, accumulator, views)
        else:
            broadcasts += _as_broadcasts(node, wanted)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    for product, (bias, accumulator, views) in added.items():
        projection = found.get(product)
        if projection is None or projection.bias is not None:
            return None
        if bias.shape != projection.weight.shape[:1]:
            return None
        projection.bias, projection.bias_node = bias, accumulator
        projection.private += views
    held = (
        {id(p.weight) for p in found.values()}
        | {id(p.bias) for p in found.values() if p.bias is not None}
        | {id(b.param) for b in broadcasts}
    )
    if held != wanted:
        return None  # a parameter used another way
    return [*found.values(), *broadcasts]


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


def _as_broadcasts(node: Node, wanted: set[int]) -> list[Broadcast]:
    """``P.expand(...)``, ``Z + P`` or ``Z * P`` with ``P`` itself an operand, ``P`` in ``wanted``."""
    name = type(node).__name__
    added = name == "AddBackward0" and node._saved_alpha == 1  # type: ignore[attr-defined]
    if name not in ("ExpandBackward0", "MulBackward0") and not added:
        return []
    shape = tuple(node._input_metadata[0].shape)
    found = []
    for index, (child, _) in enumerate(node.next_functions):
        param = getattr(child, "variable", None)
        if child is None or param is None or id(param) not in wanted:
            continue
        factor = None
        if name == "MulBackward0":
            try:  # the other operand, saved for P's gradient
                factor = getattr(node, "_saved_other" if index == 0 else "_saved_self")
            except RuntimeError:  # modified in place since the forward pass
                return []
            if not isinstance(factor, Tensor):
                return []
        detached = None if factor is None else factor.detach()
        found.append(Broadcast(GradientEdge(node, 0), shape, param, child, detached))
    return found


def usable(uses: list[Use], proof: Proof, first: int) -> list[Position] | None:
    """Where the instances lie in each use's output (edge ``first + k`` of the proof), if the
    proof covers them all (rows of a product; a dim a broadcast parameter is shared along) and no
    operation but these uses reads their parameters."""
    counted: dict[int, int] = {}
    shared: list[Node] = []
    for use in uses:
        nodes = [use.param_node] if isinstance(use, Broadcast) else [use.weight_node]
        if isinstance(use, Projection) and use.bias_node is not None:
            nodes.append(use.bias_node)
        for node in nodes:
            counted[id(node)] = counted.get(id(node), 0) + 1
            shared.append(node)
    if any(proof.consumers.get(id(node), 0) != counted[id(node)] for node in shared):
        return None
    private = [node for use in uses if isinstance(use, Projection) for node in use.private]
    if not all(proof.used_once(node) for node in private):
        return None
    positions = []
    for k, use in enumerate(uses):
        position = proof.position(first + k, output_shape(use))
        if position is None:
            return None
        if isinstance(use, Projection) and position[0] != 0:
            return None
        if isinstance(use, Broadcast):
            dim = position[0] - (len(use.shape) - use.param.ndim)
            if dim >= 0 and use.param.shape[dim] != 1:
                return None  # one entry per instance: not shared
        positions.append(position)
    return positions


def output_shape(use: Use) -> tuple[int, ...]:
    """The shape of the use's output edge."""
    return use.rows if isinstance(use, Projection) else use.shape


def projection_terms(
    uses: list[Use],
    gradients: list[Tensor],
    positions: list[Position],
    batch: int,
    dtype: torch.dtype,
) -> list[tuple[Tensor, Term]]:
    """Each parameter's term, from its uses' output gradients ``[T, *shape]`` whose instances lie
    at ``positions``."""
    weights: dict[int, tuple[Tensor, list[Tensor], list[Tensor]]] = {}
    # Biases and broadcast parameters: per-instance rows to sum over positions, [T, B, S, numel].
    sums: dict[int, tuple[Tensor, list[Tensor]]] = {}
    for use, gradient, position in zip(uses, gradients, positions, strict=True):
        if isinstance(use, Broadcast):
            if use.factor is not None:
                gradient = gradient * use.factor.to(gradient.dtype)
            per_instance = _instances_first(gradient.to(dtype), position, batch)
            target = (*per_instance.shape[:2], *([1] * (per_instance.ndim - 2 - use.param.ndim)))
            summed = per_instance.sum_to_size(*target, *use.param.shape)
            _, parts = sums.setdefault(id(use.param), (use.param, []))
            parts.append(summed.reshape(*summed.shape[:2], 1, -1))
            continue
        per_row = _instances_first(gradient.to(dtype), position, batch)  # [T, B, S, k]
        inputs = _instances_first(use.inputs.to(dtype), position, batch, leading=0)
        _, outputs_of, inputs_of = weights.setdefault(id(use.weight), (use.weight, [], []))
        outputs_of.append(per_row)
        inputs_of.append(inputs)
        if use.bias is not None:
            _, parts = sums.setdefault(id(use.bias), (use.bias, []))
            parts.append(per_row)
    terms: list[tuple[Tensor, Term]] = []
    # A bias added in exactly its weight's products shares the weight's joined output gradients,
    # so that the assembly folds its Gramian into the weight's (term_gramians).
    joined: dict[tuple[int, ...], Tensor] = {}  # ids of the (live) parts -> their join
    for weight, outputs_of, inputs_of in weights.values():
        a, b = _joined(outputs_of, dim=2), _joined(inputs_of, dim=1)
        joined[tuple(map(id, outputs_of))] = a
        terms.append((weight, OuterTerm(a, b, tuple(weight.shape))))
    for param, parts in sums.values():
        shared = joined.get(tuple(map(id, parts)))
        a = shared if shared is not None else _joined(parts, dim=2)
        terms.append((param, BiasTerm(a, tuple(param.shape))))
    return terms


def _instances_first(tensor: Tensor, position: Position, batch: int, leading: int = 1) -> Tensor:
    """``[*lead, *shape]`` to ``[*lead, B, *shape']``: the instance digit at ``position`` of
    ``shape`` taken out of its dim (``leading`` dims before it, the tasks of a gradient)."""
    dim, inner = position
    lead, shape = tensor.shape[:leading], tensor.shape[leading:]
    outer = shape[dim] // (batch * inner)
    split = tensor.reshape(*lead, *shape[:dim], outer, batch, inner, *shape[dim + 1 :])
    moved = split.movedim(leading + dim + 1, leading)  # [*lead, B, *shape[:dim], outer, inner, ...]
    return moved.reshape(*lead, batch, *shape[:dim], outer * inner, *shape[dim + 1 :])


def _joined(parts: list[Tensor], dim: int) -> Tensor:
    """The positions of every use of one parameter, side by side."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
