"""Argument normalisation and autograd-graph queries shared by every autojac function.

The graph walk answers two questions without running any backward pass: which leaf tensors a set
of outputs depends on (the default ``inputs``, like :func:`torch.autograd.backward`), and whether an
output depends on any of the requested inputs at all (so that an unrelated output is a clear error
instead of a silent row of zeros).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor
from torch.autograd.graph import Node, get_gradient_edge

from jdoptim._errors import NotDifferentiableError
from jdoptim.linalg import check_tensor


def as_tensor_list(value: Tensor | Iterable[Tensor], name: str) -> list[Tensor]:
    """``value`` as a list of floating-point tensors (a single tensor gives a list of one)."""
    if isinstance(value, Tensor):
        return [check_tensor(value, name)]
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}."
        )
    tensors = list(value)
    for index, tensor in enumerate(tensors):
        check_tensor(tensor, f"{name}[{index}]")
    return tensors


def unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    """``tensors`` without repetitions (by identity), first occurrences kept in order."""
    seen: set[int] = set()
    result = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            result.append(tensor)
    return result


def check_outputs(outputs: Sequence[Tensor], name: str) -> None:
    """Outputs must be non-empty, hold at least one element and each be part of a graph."""
    if not outputs:
        raise ValueError(f"{name} must contain at least one tensor, got an empty sequence.")
    for index, output in enumerate(outputs):
        if not output.requires_grad:
            raise ValueError(
                f"{name}[{index}] (shape {tuple(output.shape)}) does not require grad, so it does "
                "not depend on any tensor to differentiate with respect to. Compute it from "
                "parameters (or tensors) with requires_grad=True, outside torch.no_grad()."
            )
    if sum(output.numel() for output in outputs) == 0:
        raise ValueError(f"{name} have no elements: their Jacobian would have no rows.")


def check_inputs(inputs: Sequence[Tensor], name: str) -> None:
    """Inputs must be non-empty and each require grad."""
    if not inputs:
        raise ValueError(f"{name} must contain at least one tensor, got an empty sequence.")
    for index, tensor in enumerate(inputs):
        if not tensor.requires_grad:
            raise ValueError(
                f"{name}[{index}] (shape {tuple(tensor.shape)}) does not require grad; "
                "differentiate only with respect to tensors with requires_grad=True."
            )


def check_chunk_size(parallel_chunk_size: int | None) -> None:
    if parallel_chunk_size is not None and (
        isinstance(parallel_chunk_size, bool)
        or not isinstance(parallel_chunk_size, int)
        or parallel_chunk_size < 1
    ):
        raise ValueError(
            f"parallel_chunk_size must be None (all rows at once) or a positive int, got "
            f"{parallel_chunk_size!r}."
        )


def _node(tensor: Tensor) -> Node:
    return get_gradient_edge(tensor).node


def _walk(roots: Iterable[Node], stop_at: set[int]) -> list[tuple[Node, int]]:
    """Nodes reachable from ``roots``, not expanding past ``stop_at`` ids, each with a rank.

    The rank of a node is the smallest sequence number of the nodes that feed into it, which for an
    ``AccumulateGrad`` node is the position in the forward pass where its leaf was first used.
    """
    ranks: dict[int, int] = {}
    nodes: dict[int, Node] = {}
    stack = [(root, -1) for root in roots]
    while stack:
        node, rank = stack.pop()
        key = id(node)
        if key in nodes:
            ranks[key] = min(ranks[key], rank)
            continue
        nodes[key] = node
        ranks[key] = rank
        if key in stop_at:
            continue
        order = node._sequence_nr()
        # Reversed, so that children are visited (and ranked on ties) in argument order.
        children = [child for child, _ in node.next_functions if child is not None]
        stack.extend((child, order) for child in reversed(children))
    return [(node, ranks[key]) for key, node in nodes.items()]


def reachable_leaves(roots: Sequence[Tensor], stop_at: Sequence[Tensor] = ()) -> list[Tensor]:
    """The leaf tensors requiring grad that ``roots`` depend on, not looking through ``stop_at``.

    Leaves come in the order in which the forward pass first used them, which for usual models is
    the order of ``model.parameters()``. Tensors in ``stop_at`` are excluded even when they are
    leaves.
    """
    stop_nodes = [_node(tensor) for tensor in stop_at]
    stop_ids = {id(node) for node in stop_nodes}
    leaves = [
        (rank, index, node.variable)
        for index, (node, rank) in enumerate(_walk((_node(root) for root in roots), stop_ids))
        if hasattr(node, "variable") and id(node) not in stop_ids
    ]
    return [leaf for _, _, leaf in sorted(leaves, key=lambda item: item[:2])]


def graph_signature(outputs: Sequence[Tensor]) -> frozenset[str]:
    """The kinds of backward nodes in the graph of ``outputs``, with the outputs' dtypes and devices.

    Whether vmap can batch a backward pass depends on which operations it runs, so two graphs with
    the same signature (such as the graphs of two training steps) behave alike.
    """
    names = {node.name() for node, _ in _walk([_node(output) for output in outputs], set())}
    return frozenset(names | {f"{output.dtype}@{output.device.type}" for output in outputs})


def depends_on(output: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Whether the graph of ``output`` reaches any of ``inputs`` (a structural, not numeric, test)."""
    input_nodes = [_node(tensor) for tensor in inputs]
    reached = {id(node) for node, _ in _walk([_node(output)], set())}
    return any(id(node) in reached for node in input_nodes)


def reached_by(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[bool]:
    """For each input, whether the graph of ``outputs`` reaches it (one walk for all of them).

    A structural test, as autograd's own: an unreached input is one whose gradient autograd
    leaves ``None`` (so its ``.grad`` stays ``None``), whereas a reached one gets a gradient even
    where it is numerically zero.
    """
    reached = {id(node) for node, _ in _walk([_node(output) for output in outputs], set())}
    return [id(_node(tensor)) in reached for tensor in inputs]


def check_dense_gradients(outputs: Sequence[Tensor]) -> None:
    """Raises ``ValueError`` if the graph gives some tensor a sparse gradient.

    ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` backpropagate sparse
    gradients, which a Jacobian (one dense row per output element) cannot hold. Checked before
    any backward pass, so nothing has changed when it raises.
    """
    for node, _ in _walk([_node(output) for output in outputs], set()):
        if getattr(node, "_saved_sparse", False) is True:
            shapes = [
                tuple(child.variable.shape)
                for child, _ in node.next_functions
                if child is not None and hasattr(child, "variable")
            ]
            weight = f" of shape {shapes[0]}" if shapes else ""
            raise ValueError(
                f"The graph has a {node.name().removesuffix('Backward0')} with sparse gradients "
                f"(its weight{weight}), from nn.Embedding(sparse=True) or "
                "nn.EmbeddingBag(sparse=True). Jacobian descent needs dense gradients: build that "
                "module with sparse=False."
            )


def check_outputs_depend_on_inputs(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], name: str
) -> None:
    for index, output in enumerate(outputs):
        if not depends_on(output, inputs):
            raise NotDifferentiableError(
                f"{name}[{index}] (shape {tuple(output.shape)}) does not depend on any of the "
                f"{len(inputs)} inputs, so its Jacobian rows are undefined. Pass the inputs it was "
                "computed from (or inputs=None for all the leaves it depends on)."
            )
