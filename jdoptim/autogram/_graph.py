"""One walk of the autograd graph of an output: which calls and which parameters feed it.

Each recorded call is a black box: the walk jumps from its outputs to its inputs. A covered
parameter reached *outside* every black box is used outside its module's forward (functional use,
weight tying, a parameter added to the loss...). For a generic call (no closed form), a second walk
of its inside collects the parameters it uses. Which exact path each parameter can take follows
from the set of places where it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from jdoptim.autogram._records import CallRecord, records_at

#: Where a parameter is used: ``"outside"``, a closed-form module, or a generic call.
Place = tuple[str, int]
OUTSIDE: Place = ("outside", 0)


@dataclass
class GraphPlan:
    """The result of :func:`walk_graph`."""

    records: list[CallRecord] = field(default_factory=list)
    places: dict[int, set[Place]] = field(default_factory=dict)
    generic_params: dict[int, list[Tensor]] = field(default_factory=dict)
    mixing_modules: list[nn.Module] = field(default_factory=list)
    opaque_nodes: list[str] = field(default_factory=list)
    # Calls whose output comes from the same autograd node as their input (a compiled region that
    # fused the call with what precedes it): not black boxes, their parameters go exact.
    fused_modules: list[nn.Module] = field(default_factory=list)


# Backward nodes that run a hidden backward pass of their own (parameters inside are invisible).
_OPAQUE_NODE_NAMES = ("CheckpointFunctionBackward",)


def closed_form_place(module: nn.Module) -> Place:
    return ("module", id(module))


def generic_place(record: CallRecord) -> Place:
    return ("call", id(record))


def walk_graph(output: Tensor, covered: dict[int, Tensor]) -> GraphPlan:
    """Walks the graph of ``output``; ``covered`` maps ``id(param)`` to the covered parameters."""
    plan = GraphPlan()
    reached: dict[int, CallRecord] = {}
    generic_queue: list[CallRecord] = []
    root = get_gradient_edge(output).node
    _explore(plan, covered, reached, generic_queue, [root], set(), None)
    while generic_queue:
        record = generic_queue.pop()
        starts = [edge.node for edge in record.reached_outputs]
        stops = {id(edge.node) for edge in record.input_edges}
        _explore(plan, covered, reached, generic_queue, starts, stops, record)
    for param_id, places in plan.places.items():
        # A gradient hook on the parameter (a pruning mask) changes its gradient of every loss:
        # the exact route's backward passes run it, a closed form or a projection would not.
        if covered[param_id]._backward_hooks:
            places.add(OUTSIDE)
    return plan


def _explore(
    plan: GraphPlan,
    covered: dict[int, Tensor],
    reached: dict[int, CallRecord],
    generic_queue: list[CallRecord],
    starts: list[Node],
    stops: set[int],
    scope: CallRecord | None,
) -> None:
    place = OUTSIDE if scope is None else generic_place(scope)
    seen: set[Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) in covered:
                plan.places.setdefault(id(variable), set()).add(place)
                if scope is not None:
                    params = plan.generic_params.setdefault(id(scope), [])
                    if all(p is not variable for p in params):
                        params.append(variable)
            continue
        name = node.name()
        if any(opaque in name for opaque in _OPAQUE_NODE_NAMES):
            plan.opaque_nodes.append(name)
        entries = _unfused(plan, node, records_at(node))
        box = _black_box(entries, scope)
        for record, _, _ in entries:
            if record.mixes_instances and all(m is not record.module for m in plan.mixing_modules):
                plan.mixing_modules.append(record.module)
        if box is not None:
            record, output_nr, shape = box
            _reach(plan, reached, record, node, output_nr, shape)
            if record.rule is None:
                if id(record) not in {id(r) for r in generic_queue}:
                    generic_queue.append(record)
            else:
                for module_param in _direct_covered(record, covered):
                    plan.places.setdefault(id(module_param), set()).add(
                        closed_form_place(record.module)
                    )
            stack.extend(e.node for e in record.input_edges if id(e.node) not in stops)
            continue
        for child, _ in node.next_functions:
            if child is not None and id(child) not in stops:
                stack.append(child)


def _unfused(
    plan: GraphPlan, node: Node, entries: list[tuple[CallRecord, int, tuple[int, ...]]]
) -> list[tuple[CallRecord, int, tuple[int, ...]]]:
    """The entries whose call can be a black box: its inputs come from other nodes."""
    kept = []
    for entry in entries:
        record = entry[0]
        if any(edge.node is node for edge in record.input_edges):
            if all(m is not record.module for m in plan.fused_modules):
                plan.fused_modules.append(record.module)
        else:
            kept.append(entry)
    return kept


def _black_box(
    entries: list[tuple[CallRecord, int, tuple[int, ...]]], scope: CallRecord | None
) -> tuple[CallRecord, int, tuple[int, ...]] | None:
    """The outermost call whose output is produced at this node, inside the current scope.

    Entries are innermost first. Outside every call any record qualifies; inside a generic call
    only the closed-form calls nested in it do (nested generic calls are walked through, so their
    parameters count as used by the enclosing call).
    """
    if scope is None:
        return entries[-1] if entries else None
    inside = entries
    for index, entry in enumerate(entries):
        if entry[0] is scope:
            inside = entries[:index]
            break
    closed_form = [entry for entry in inside if entry[0].rule is not None]
    return closed_form[-1] if closed_form else None


def _reach(
    plan: GraphPlan,
    reached: dict[int, CallRecord],
    record: CallRecord,
    node: Node,
    output_nr: int,
    shape: tuple[int, ...],
) -> None:
    if id(record) not in reached:
        reached[id(record)] = record
        record.reached_outputs = []
        record.output_shapes = []
        plan.records.append(record)
    if all(e.node is not node or e.output_nr != output_nr for e in record.reached_outputs):
        record.reached_outputs.append(GradientEdge(node, output_nr))
        record.output_shapes.append(shape)


def _direct_covered(record: CallRecord, covered: dict[int, Tensor]) -> list[Tensor]:
    return [p for p in record.params.values() if id(p) in covered]
