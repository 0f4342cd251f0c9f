"""Proving from the autograd graph alone that the losses are independent across the batch dim.

The fast routes read instance ``i``'s gradient at a layer output ``Y`` off slice ``i`` of the
gradient of the summed losses, which needs ``∂lossᵢ/∂Y`` to vanish outside slice ``i`` (see
:mod:`jdoptim.autogram._independence`). For most models this follows from the graph's structure:
walk it from the losses down to every ``Y`` and, at each operation, map where the instances lie in
its output to where they lie in each input it differentiates, by a rule that depends only on the
operation's type, its saved dims and the shapes (an elementwise operation keeps the instances where
they are, a transpose moves them, a matrix product keeps them in the rows of its first factor and
mixes them into its second, a softmax keeps them unless it normalises across them). If every
operation between the losses and the outputs has a rule, no input that leads to an output is mixed,
and the consumers of every tensor agree, the property holds at every output whatever the values:
the pass needs no probe rows (one backward pass instead of two). Anything else (an operation
without a rule, a custom autograd Function, a compiled region, a mixing input) ends the proof and
the pass falls back to the numerical probes, which decide from the gradients themselves.

Where the instances lie in a tensor is one digit of its row-major index: instance ``i`` holds the
entries whose flat index ``f`` has ``(f // stride) % B == i``. A dim of size ``B`` is the digit of
stride ``prod(shape[d + 1:])``; a dim that merges the instances with other positions (``[B * S, d]``
after a reshape) holds it at a multiple of that stride. Reshapes keep the flat order, so the
stride; other rules work on the ``(dim, inner)`` form, ``inner`` being the digit's stride within
its dim.

Gradient hooks registered on intermediate tensors (``Tensor.register_hook``) are not part of the
graph: the proof assumes they act entry by entry (rescaling, clipping, logging), as the closed
forms already do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

#: Where the instances lie in a tensor: ``(dim, inner)``, the digit of stride ``inner`` in ``dim``.
Position = tuple[int, int]
#: Per input of an operation: the instances' position in it, or ``None`` if the operation mixes
#: them there (or no rule can tell).
Claims = list[Position | None]


class _Unproven(Exception):
    """The structure does not prove independence; the probes decide."""


@dataclass
class Proof:
    """What a successful walk established: where the instances lie in each edge, and how many
    operations of the graph consume each node's outputs."""

    batch: int
    strides: list[int | None]
    consumers: dict[int, int]

    def position(self, index: int, shape: tuple[int, ...]) -> Position | None:
        """The instances' ``(dim, inner)`` in edge ``index`` (of ``shape``), if it was reached."""
        stride = self.strides[index]
        return None if stride is None else _locate(shape, stride, self.batch)

    def batch_dim(self, index: int, shape: tuple[int, ...]) -> int | None:
        """The dim of edge ``index`` that is exactly the instance dim, if there is one."""
        position = self.position(index, shape)
        if position is None or position[1] != 1 or shape[position[0]] != self.batch:
            return None
        return position[0]

    def used_once(self, node: Node) -> bool:
        """Whether exactly one operation of the graph consumes ``node``'s outputs."""
        return self.consumers.get(id(node), 0) == 1


# What ends a proof: no rule, a mixing input, disagreeing consumers (_Unproven); an overload
# without the saved dims its rule reads, such as a full reduction (attribute and type errors);
# shapes that cannot be read, such as a nested tensor's (runtime errors).
_FAILURES = (_Unproven, AttributeError, TypeError, IndexError, RuntimeError)


def prove(
    output: Tensor,
    batch_dim: int,
    edges: Sequence[GradientEdge],
    extra: Sequence[GradientEdge] = (),
) -> Proof | None:
    """The structural proof that ``output``'s losses reach only their own instance's slice of
    every edge, or ``None`` when the walk meets anything it cannot prove.

    ``edges`` are tensors in ``output``'s graph (layer outputs); ``output`` holds ``B >= 2``
    instances along ``batch_dim``. ``extra`` are more tensors (outputs of operations inside
    calls) wanted where they can be proven: what cannot be proven on the way to them only leaves
    their stride ``None`` (after the edges' in :attr:`Proof.strides`).
    """
    try:
        return _Walk(output, batch_dim, edges, extra).proof()
    except _FAILURES:
        return None


class _Walk:
    """One walk from the losses to the edges, carrying the instances' stride in every tensor."""

    def __init__(
        self,
        output: Tensor,
        batch_dim: int,
        edges: Sequence[GradientEdge],
        extra: Sequence[GradientEdge],
    ) -> None:
        self.batch = output.shape[batch_dim]
        self.edges = [(id(edge.node), edge.output_nr) for edge in edges]
        self.extra = [(id(edge.node), edge.output_nr) for edge in extra]
        self.required = set(self.edges)
        self.targets = self.required | set(self.extra)
        root = get_gradient_edge(output)
        self.root = root.node
        # Strides claimed for each tensor (node id, output number) by each of its consumers.
        self.claims: dict[tuple[int, int], list[int]] = {
            (id(root.node), root.output_nr): [_stride(tuple(output.shape), batch_dim, 1)]
        }
        # Tensors off the paths to the edges whose gradients may mix instances (from an
        # operation the walk could not prove), and the nodes that produced them.
        self.poisoned: set[tuple[int, int]] = set()
        self.poisoned_nodes: set[int] = set()
        # Each node's inputs (``next_functions``) and input-metadata shapes (the shapes of the
        # tensors it outputs), each read once: every pass, and every consumer, needs them again.
        self.inputs: dict[int, tuple[tuple[Node | None, int], ...]] = {}
        self.shapes: dict[int, list[tuple[int, ...]]] = {}

    def proof(self) -> Proof:
        order = _post_order(self.root, self.inputs)
        relevant: set[int] = set()  # nodes that reach a target
        needed: set[int] = set()  # nodes that reach an edge: where every failure is final
        consumers: dict[int, int] = {}
        for node in order:
            for child, nr in self.inputs[id(node)]:
                if child is not None:
                    consumers[id(child)] = consumers.get(id(child), 0) + 1
                    if id(child) in relevant or (id(child), nr) in self.targets:
                        relevant.add(id(node))
                    if id(child) in needed or (id(child), nr) in self.required:
                        needed.add(id(node))
        # Reversed post-order is topological: every consumer of a node comes before it.
        for node in reversed(order):
            if id(node) in relevant:
                self._visit(node, relevant, needed)
        strides = [self._agreed(key) for key in self.edges]
        for key in self.extra:
            try:
                strides.append(None if key in self.poisoned else self._agreed(key))
            except _Unproven:
                strides.append(None)
        return Proof(self.batch, strides, consumers)

    def _visit(self, node: Node, relevant: set[int], needed: set[int]) -> None:
        # Only the inputs that lead to a target need a position (and a shape).
        children = [
            (child, nr)
            if child is not None and (id(child) in relevant or (id(child), nr) in self.targets)
            else None
            for child, nr in self.inputs[id(node)]
        ]
        rule = None if isinstance(node, BackwardCFunction) else _RULES.get(type(node).__name__)
        poisoned = id(node) in self.poisoned_nodes
        if not poisoned and rule is _elementwise and self._passes_through(node, children):
            return
        try:
            # No rule, or a custom autograd Function borrowing a builtin's name.
            if poisoned or rule is None:
                raise _Unproven
            shapes, claims = self._claims(node, rule, children)
        except _FAILURES:
            if id(node) in needed:
                raise
            self._poison(children)
            return
        for edge, child_shape, position in zip(children, shapes, claims, strict=True):
            if edge is None:
                continue
            if position is None or child_shape is None:
                if id(edge[0]) in needed or _edge_key(edge) in self.required:
                    raise _Unproven
                self._poison([edge])
                continue
            self.claims.setdefault(_edge_key(edge), []).append(_stride(child_shape, *position))

    def _passes_through(self, node: Node, children: list[tuple[Node, int] | None]) -> bool:
        """The common case of an elementwise operation on its own: when its relevant inputs all
        have its output's shape, it hands each of them the output's stride as it is (what
        :meth:`_claims` and :func:`_elementwise` would give, without building the site).
        ``False``: not this case."""
        outputs = self._shapes_of(node)
        if len(outputs) != 1:
            return False
        try:
            stride = self._agreed((id(node), 0))
        except _Unproven:
            return False
        if stride is None or _locate(outputs[0], stride, self.batch) is None:
            return False
        keys = []
        for edge in children:
            if edge is not None:
                if self._shapes_of(edge[0])[edge[1]] != outputs[0]:
                    return False
                keys.append(_edge_key(edge))
        for key in keys:
            self.claims.setdefault(key, []).append(stride)
        return True

    def _claims(
        self, node: Node, rule: Rule, children: list[tuple[Node, int] | None]
    ) -> tuple[list[tuple[int, ...] | None], Claims]:
        """The shapes of the relevant inputs and the positions ``rule`` (the node's) gives them."""
        outputs = self._shapes_of(node)
        positions: list[Position | None] = []
        for nr, shape in enumerate(outputs):
            stride = self._agreed((id(node), nr))
            positions.append(
                None if stride is None else _required(_locate(shape, stride, self.batch))
            )
        shapes = [None if edge is None else self._shapes_of(edge[0])[edge[1]] for edge in children]
        return shapes, rule(_Site(node, outputs, positions, shapes, self.batch))

    def _shapes_of(self, node: Node) -> list[tuple[int, ...]]:
        shapes = self.shapes.get(id(node))
        if shapes is None:
            shapes = [tuple(meta.shape) for meta in node._input_metadata]
            self.shapes[id(node)] = shapes
        return shapes

    def _poison(self, children: list[tuple[Node, int] | None]) -> None:
        for edge in children:
            if edge is not None:
                self.poisoned.add(_edge_key(edge))
                self.poisoned_nodes.add(id(edge[0]))

    def _agreed(self, key: tuple[int, int]) -> int | None:
        claimed = self.claims.get(key)
        if not claimed:
            return None
        first = claimed[0]
        if len(claimed) > 1 and claimed.count(first) != len(claimed):
            raise _Unproven
        return first


def _edge_key(edge: tuple[Node, int]) -> tuple[int, int]:
    return (id(edge[0]), edge[1])


def _post_order(root: Node, inputs: dict[int, tuple[tuple[Node | None, int], ...]]) -> list[Node]:
    """Every node of the graph, each after all the nodes it reaches; fills ``inputs`` with each
    node's ``next_functions``."""
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in inputs:
            continue
        children = inputs[id(node)] = node.next_functions
        stack.append((node, True))
        stack.extend((child, False) for child, _ in children if child is not None)
    return order


def _stride(shape: tuple[int, ...], dim: int, inner: int) -> int:
    return inner * math.prod(shape[dim + 1 :])


def _locate(shape: tuple[int, ...], stride: int, batch: int) -> Position | None:
    """The ``(dim, inner)`` form of the digit of ``stride`` in ``shape``, if it is one."""
    suffix = 1
    for dim in reversed(range(len(shape))):
        size = shape[dim]
        if suffix <= stride < suffix * size:
            if stride % suffix:
                return None
            inner = stride // suffix
            return (dim, inner) if size % (inner * batch) == 0 else None
        suffix *= size
    return None


def _required(position: Position | None) -> Position:
    if position is None:
        raise _Unproven
    return position


@dataclass(slots=True)
class _Site:
    """One operation as its rule sees it: its outputs' shapes and the instances' position in each
    (``None`` for an output no loss reaches), the shapes of its inputs that lead to a layer output
    (``None`` for the others: their claims are not used)."""

    node: Node
    outputs: list[tuple[int, ...]]
    positions: list[Position | None]
    inputs: list[tuple[int, ...] | None]
    batch: int

    def single(self) -> tuple[tuple[int, ...], Position]:
        """The shape and position of the only output the losses reach, which must be the first."""
        first = self.positions[0]
        if first is None or any(p is not None for p in self.positions[1:]):
            raise _Unproven
        return self.outputs[0], first

    def agreed(self) -> tuple[tuple[int, ...], Position]:
        """Several outputs of one shape and role (a split): the position they all hold."""
        reached = [(s, p) for s, p in zip(self.outputs, self.positions, strict=True) if p]
        if not reached or any(p != reached[0][1] for _, p in reached):
            raise _Unproven
        return reached[0]

    def dim(self, name: str, ndim: int) -> int:
        return _normalized(getattr(self.node, name), ndim)


def _normalized(dim: int, ndim: int) -> int:
    # Negative dims are saved as unsigned 64-bit integers.
    dim = int(dim)
    if dim >= 2**63:
        dim -= 2**64
    return dim % ndim if ndim else 0


def _broadcast(
    output: tuple[int, ...], position: Position, operand: tuple[int, ...] | None
) -> Position | None:
    """Where the instances lie in an operand broadcast to ``output`` (``None``: it is shared by
    every instance, so its gradient sums theirs)."""
    if operand is None:
        return None
    dim = position[0] - (len(output) - len(operand))
    if dim < 0 or operand[dim] != output[position[0]]:
        return None
    return (dim, position[1])


Rule = Callable[[_Site], Claims]


def _elementwise(site: _Site) -> Claims:
    """Entry ``k`` of the output depends on entry ``k`` of each (broadcast) input only."""
    output, position = site.single()
    return [_broadcast(output, position, shape) for shape in site.inputs]


def _unreduced_loss(site: _Site) -> Claims:
    """A loss with ``reduction="none"`` is elementwise; a reduced one has no instances left."""
    if getattr(site.node, "_saved_reduction", None) != 0:
        raise _Unproven
    return _elementwise(site)


def _reshaped(site: _Site) -> Claims:
    """Views, reshapes, squeezes: the flat order, hence the stride, is unchanged."""
    output, (dim, inner) = site.single()
    stride = _stride(output, dim, inner)
    return [None if shape is None else _locate(shape, stride, site.batch) for shape in site.inputs]


def _transposed_2d(site: _Site) -> Claims:
    output, (dim, inner) = site.single()
    return [(1 - dim if len(output) == 2 else dim, inner)] * len(site.inputs)


def _transposed(site: _Site) -> Claims:
    output, (dim, inner) = site.single()
    first, second = site.dim("_saved_dim0", len(output)), site.dim("_saved_dim1", len(output))
    moved = second if dim == first else first if dim == second else dim
    return [(moved, inner)] * len(site.inputs)


def _permuted(site: _Site) -> Claims:
    output, (dim, inner) = site.single()
    order = [_normalized(d, len(output)) for d in site.node._saved_dims]  # type: ignore[attr-defined]
    return [(order[dim], inner)] * len(site.inputs)


def _selected(site: _Site) -> Claims:
    """``select(dim, i)`` drops ``dim``, which cannot hold the instances."""
    _, (dim, inner) = site.single()
    return [_reinserted(site, dim, inner)]


def _unbound(site: _Site) -> Claims:
    """``unbind(dim)``: every output lacks ``dim``, and they must agree on the instances."""
    _, (dim, inner) = site.agreed()
    return [_reinserted(site, dim, inner)]


def _reinserted(site: _Site, dim: int, inner: int) -> Position:
    """The instances' position in the input of an operation that removed its ``_saved_dim``."""
    source = site.inputs[0]
    if source is None:
        raise _Unproven
    removed = site.dim("_saved_dim", len(source))
    return (dim + (dim >= removed), inner)


def _along_one_dim(site: _Site) -> Claims:
    """Operations that act along one dim only (``softmax``, ``cumsum``, ``index_select``,
    ``gather``, ``cat``): the instances keep their place, provided they do not lie in that dim."""
    output, position = site.single()
    if position[0] == site.dim("_saved_dim", len(output)):
        raise _Unproven
    return [_broadcast(output, position, shape) for shape in site.inputs]


def _sliced(site: _Site) -> Claims:
    """A slice along another dim, or one that keeps every entry."""
    output, position = site.single()
    if site.inputs[0] == output:
        return [position]
    return _along_one_dim(site)


def _stacked(site: _Site) -> Claims:
    output, (dim, inner) = site.single()
    new = site.dim("_saved_dim", len(output))
    if dim == new:
        raise _Unproven
    return [(dim - (dim > new), inner)] * len(site.inputs)


def _split(site: _Site) -> Claims:
    output, position = site.agreed()
    if position[0] == site.dim("_saved_dim", len(output)):
        raise _Unproven
    return [position] * len(site.inputs)


def _reduced(site: _Site) -> Claims:
    """Sums, means, norms over some dims: the instances' dim must be kept."""
    _, (dim, inner) = site.single()
    source = site.inputs[0]
    if source is None:
        raise _Unproven
    saved = site.node._saved_dim  # type: ignore[attr-defined]
    dims = [saved] if isinstance(saved, int) else list(saved)
    reduced = {_normalized(d, len(source)) for d in dims}
    if not reduced:  # an empty dim list reduces every dim
        raise _Unproven
    kept = list(range(len(source)))
    if not site.node._saved_keepdim:  # type: ignore[attr-defined]
        kept = [d for d in kept if d not in reduced]
    if kept[dim] in reduced:
        raise _Unproven
    return [(kept[dim], inner)]


def _matrix_product(first: int, second: int) -> Rule:
    """``mm``, ``addmm``, ``bmm``, ``baddbmm``: an output row depends on the same row of the first
    factor and on all of the second, an output column on all of the first; the leading dim of a
    batched product on the same matrices of both. A bias term broadcasts."""

    def rule(site: _Site) -> Claims:
        output, (dim, inner) = site.single()
        batched, columns = len(output) == 3, len(output) - 1
        claims: Claims = [_broadcast(output, (dim, inner), shape) for shape in site.inputs]
        claims[first] = (dim, inner) if dim != columns else None
        claims[second] = (dim, inner) if dim == columns or (batched and dim == 0) else None
        return claims

    return rule


def _normalized_over_last(site: _Site) -> Claims:
    """Layer norm: each instance normalised over its trailing dims; weight and bias are shared."""
    output, position = site.single()
    trailing = len(site.node._saved_normalized_shape)  # type: ignore[attr-defined]
    if position[0] >= len(output) - trailing:
        raise _Unproven
    return [position] + [None] * (len(site.inputs) - 1)


def _batch_norm(site: _Site) -> Claims:
    """Batch norm with running statistics (``eval()``) is an affine map of each entry. With batch
    statistics (one per channel, dim 1, over every other dim) it mixes the instances, unless they
    lie along the channels: instance norm runs as batch norm on ``[1, B·C, ...]``, where each
    channel belongs to one instance."""
    _, position = site.single()
    if site.node._saved_training and position[0] != 1:  # type: ignore[attr-defined]
        raise _Unproven
    return [position] + [None] * (len(site.inputs) - 1)


def _padded(site: _Site) -> Claims:
    """``F.pad(x, pad)`` with a constant: the instances' dim must be neither padded nor cropped."""
    output, (dim, inner) = site.single()
    pad = site.node._saved_pad  # type: ignore[attr-defined]
    side = len(output) - 1 - dim  # pad[2 * side], pad[2 * side + 1] apply to ``dim``
    if 2 * side < len(pad) and (pad[2 * side] or pad[2 * side + 1]):
        raise _Unproven
    return [(dim, inner)]


def _repeated(site: _Site) -> Claims:
    """``repeat(*repeats)`` tiles the input; the instances' dim must not be repeated."""
    _, (dim, inner) = site.single()
    repeats = site.node._saved_repeats  # type: ignore[attr-defined]
    leading = len(repeats) - len(site.node._saved_self_sym_sizes)  # type: ignore[attr-defined]
    if dim < leading or repeats[dim] != 1:
        raise _Unproven
    return [(dim - leading, inner)]


def _first_dim_only(site: _Site) -> Claims:
    """Group norm and convolutions: separate along the leading (batch) dim only."""
    _, position = site.single()
    if position[0] != 0:
        raise _Unproven
    return [position] + [None] * (len(site.inputs) - 1)


def _spatial(trailing: int) -> Rule:
    """Pooling and upsampling over the last ``trailing`` dims."""

    def rule(site: _Site) -> Claims:
        output, position = site.single()
        if position[0] >= len(output) - trailing:
            raise _Unproven
        return [_broadcast(output, position, shape) for shape in site.inputs]

    return rule


def _attention(site: _Site) -> Claims:
    """Scaled dot-product attention mixes the last two dims (positions, features) only."""
    output, position = site.single()
    if position[0] >= len(output) - 2:
        raise _Unproven
    return [_broadcast(output, position, shape) for shape in site.inputs]


def _negative_log_likelihood(site: _Site) -> Claims:
    """``nll_loss(reduction="none")``: input ``[N, C, d...]``, output ``[N, d...]``."""
    if getattr(site.node, "_saved_reduction", None) != 0:
        raise _Unproven
    output, (dim, inner) = site.single()
    claims: Claims = [None] * len(site.inputs)
    source = site.inputs[0]
    if source is not None and len(source) == len(output) + 1:
        claims[0] = (dim if dim == 0 else dim + 1, inner)
    return claims


_ELEMENTWISE = """
    Add Sub Rsub Mul Div Neg Relu Threshold Gelu Silu Mish Tanh Sigmoid Elu LeakyRelu Hardtanh
    Hardswish Hardsigmoid Softplus Exp Exp2 Expm1 Log Log1p Log2 Log10 Sqrt Rsqrt Pow Abs Clamp
    ClampMin ClampMax Sin Cos Erf Reciprocal Where MaskedFill Clone ToCopy Alias Maximum Minimum
    Atan Atan2 Lerp Addcmul Addcdiv Sign Round Floor Ceil NativeDropout Expand Square Softshrink
    Hardshrink LogSigmoid Sgn Trunc Frac PreluKernel
"""
_UNREDUCED_LOSSES = "MseLoss HuberLoss SmoothL1Loss BinaryCrossEntropyWithLogits BinaryCrossEntropy"
_RESHAPES = "View UnsafeView ReshapeAlias Squeeze Unsqueeze"
_REDUCTIONS = "Sum Mean Amax Amin Logsumexp LinalgVectorNorm Max Min Std Var"
_ATTENTION = """
    ScaledDotProductFlashAttentionForCpu ScaledDotProductEfficientAttention
    ScaledDotProductFlashAttention ScaledDotProductCudnnAttention
"""
_SPATIAL = {
    "MaxPool2DWithIndices": 2,
    "MaxPool3DWithIndices": 3,
    "AvgPool2D": 2,
    "AvgPool3D": 3,
    "AdaptiveAvgPool2D": 2,
    "AdaptiveAvgPool3D": 3,
    "AdaptiveMaxPool2D": 2,
    "AdaptiveMaxPool3D": 3,
    "UpsampleNearest1D": 1,
    "UpsampleNearest2D": 2,
    "UpsampleNearest3D": 3,
    "UpsampleLinear1D": 1,
    "UpsampleBilinear2D": 2,
    "UpsampleBicubic2D": 2,
    "UpsampleTrilinear3D": 3,
}


def _table() -> dict[str, Rule]:
    """Rules by backward node class name (``AddBackward0``...), for every overload number."""
    by_stem: dict[str, Rule] = {}
    for stem in _ELEMENTWISE.split():
        by_stem[stem] = _elementwise
    for stem in _UNREDUCED_LOSSES.split():
        by_stem[stem] = _unreduced_loss
    for stem in _RESHAPES.split():
        by_stem[stem] = _reshaped
    for stem in _REDUCTIONS.split():
        by_stem[stem] = _reduced
    for stem in _ATTENTION.split():
        by_stem[stem] = _attention
    for stem, trailing in _SPATIAL.items():
        by_stem[stem] = _spatial(trailing)
    by_stem.update(
        T=_transposed_2d,
        Transpose=_transposed,
        Permute=_permuted,
        Select=_selected,
        Slice=_sliced,
        IndexSelect=_along_one_dim,
        Gather=_along_one_dim,
        Softmax=_along_one_dim,
        LogSoftmax=_along_one_dim,
        SafeSoftmax=_along_one_dim,
        Cumsum=_along_one_dim,
        Cat=_along_one_dim,
        Stack=_stacked,
        Split=_split,
        SplitWithSizes=_split,
        UnsafeSplit=_split,
        UnsafeSplitWithSizes=_split,
        Unbind=_unbound,
        Mm=_matrix_product(0, 1),
        Addmm=_matrix_product(1, 2),
        Bmm=_matrix_product(0, 1),
        Baddbmm=_matrix_product(1, 2),
        NativeLayerNorm=_normalized_over_last,
        NativeGroupNorm=_first_dim_only,
        NativeBatchNorm=_batch_norm,
        CudnnBatchNorm=_batch_norm,
        ConstantPadNd=_padded,
        Repeat=_repeated,
        Convolution=_first_dim_only,
        NllLoss=_negative_log_likelihood,
        NllLoss2D=_negative_log_likelihood,
    )
    return {f"{stem}Backward{n}": rule for stem, rule in by_stem.items() for n in range(4)}


_RULES = _table()
