"""The autogram engine: the Gramian ``J Jᵀ`` of any tensor's Jacobian, without storing ``J``."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from jdoptim._compile_config import allow_several_backward_passes
from jdoptim._errors import NotDifferentiableError
from jdoptim._global_hooks import guarded, remove_deferred_hooks, remove_hook
from jdoptim._warnings import warn
from jdoptim.autogram._assembly import (
    grad_from_terms,
    gramian_from_terms,
    instance_major_order,
    scaled_gramian_from_terms,
)
from jdoptim.autogram._batched import BatchedPass
from jdoptim.autogram._graph import GraphPlan, walk_graph
from jdoptim.autogram._jacobian import exact_terms
from jdoptim.autogram._records import mixes_instances, record_call
from jdoptim.autogram._replay import hooks_are_suspended
from jdoptim.autogram._rules import ClosedFormRule, closed_form_rule
from jdoptim.autogram._terms import MaterializedTerm, OuterTerm, Route, Term

_DONATED_BUFFERS_HINT = (
    "output was computed by a torch.compile'd function whose backward frees its saved tensors "
    "after one pass (AOTAutograd's donated buffers), while the Gramian needs several passes over "
    "the graph. jdoptim turns them off when an optimizer or Engine is built; something set "
    "torch._functorch.config.donated_buffer = True again since, or the function was compiled "
    "before: keep it False, and compile after building the optimizer (torch._dynamo.reset() "
    "recompiles)."
)
_FREED_GRAPH_HINT = (
    "The graph of `output` was already freed (a backward() ran on it without retain_graph=True). "
    "Run the forward pass again, then call compute_gramian before any backward()."
)


@dataclass(frozen=True)
class RouteReport:
    """How :class:`Engine` computed one parameter's part of its last Gramian.

    ``route`` is the exact route the parameter took (closed form, replay, local, exact); ``form``
    how its term's Gramian is formed (:attr:`Term.form`: ``"pairwise"``, ``"materialized"`` or
    ``"rows"``). For a layer term in factored form (``Linear``, convolutions, attention
    projections), ``positions`` is its number of positions per instance ``S`` (sequence length,
    output pixels of a convolution) and ``pairwise_cost`` / ``materialized_cost`` are the
    multiply-adds of each form (the Gramian plus the weighted gradient; the cheaper one is used
    unless the pairwise kernel would not fit in memory); ``None`` for other terms.
    """

    name: str
    module: str
    shape: tuple[int, ...]
    route: Route
    form: str
    positions: int | None = None
    pairwise_cost: int | None = None
    materialized_cost: int | None = None


# One parameter of the last pass: (parameter, route, form, positions, (pairwise, materialized)).
_Reported = tuple[Tensor, Route, str, int | None, tuple[int, int] | None]


@dataclass
class _Pending:
    """What :meth:`Engine.backward` needs from the last Gramian pass."""

    terms: list[tuple[Tensor, Term]]
    shape: tuple[int, ...]
    batch_dim: int | None


class Engine:
    """Computes the Gramian of the Jacobian of a tensor w.r.t. the parameters of some modules.

    ``Engine(*modules, batch_dim=..., parameters=None)``: each positional argument is a module or an
    iterable of modules; the engine covers every parameter that requires grad in them (their own
    and their children's, each once). With ``parameters`` and no modules, the engine covers exactly
    those parameters and finds the modules that own them while :meth:`capture` is active.

    ``batch_dim`` is the dim of the differentiated output that indexes independent instances (loss
    ``i`` depends on instance ``i`` only), or ``None``. With it, one backward pass of activation
    gradients plus closed-form per-layer rules give the Gramian (the idea of Algorithm 3 of
    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024); parameters outside
    what the rules support are handled by exact per-instance vector-Jacobian products. Without it,
    the Gramian is computed from exact per-row Jacobians, valid for any graph. See
    ``docs/autogram.md``.

    The engine registers forward hooks on the modules; :meth:`close` removes them (or use the
    engine as a context manager: ``with Engine(model, batch_dim=0) as engine: ...``).
    """

    def __init__(
        self,
        *modules: nn.Module | Iterable[nn.Module],
        batch_dim: int | None,
        parameters: Iterable[Tensor] | None = None,
    ) -> None:
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"batch_dim must be an int or None, got {type(batch_dim).__name__}.")
        allow_several_backward_passes()
        self._batch_dim = batch_dim
        self._modules = _flatten_modules(modules)
        if parameters is not None:
            params = [p for p in parameters]
            for p in params:
                if not isinstance(p, Tensor):
                    raise TypeError(f"parameters must hold tensors, got {type(p).__name__}.")
        else:
            if not self._modules:
                raise ValueError(
                    "Engine needs modules (Engine(model, batch_dim=0)) or parameters "
                    "(Engine(batch_dim=0, parameters=model.parameters()))."
                )
            params = [p for m in self._modules for p in m.parameters()]
        self._params: list[Tensor] = []
        seen: set[int] = set()
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        self._param_ids = seen
        self._pending: _Pending | None = None
        # How each parameter's part of the last Gramian was computed (diagnostics and tests).
        self._last_routes: dict[int, Route] = {}
        self._last_report: list[_Reported] = []
        # Draws the probe weights of the independence check (seeded: runs are reproducible).
        self._probe_generator = torch.Generator().manual_seed(0)
        self._rules: weakref.WeakKeyDictionary[
            nn.Module, tuple[tuple[type, tuple[str, ...]], bool, ClosedFormRule | None]
        ] = weakref.WeakKeyDictionary()
        self._closed = False
        # Tables of nn.Embedding(sparse=True): autograd gives them sparse gradients, so does backward.
        self._sparse_params = {
            id(m.weight) for root in self._modules for m in root.modules() if _is_sparse_table(m)
        }
        # The hook inspects autograd nodes, which torch.compile cannot trace: it runs eagerly, and
        # a compiled model breaks its graph around each hooked module call (the glue between
        # layers stays compiled; see docs/autogram.md).
        self._eager_hook: Callable[..., None] = torch.compiler.disable(self._hook)  # type: ignore[no-untyped-call]
        self._warned: set[int] = set()
        self._handles: list[RemovableHandle] = []
        self._hook_ids: set[int] = set()
        self._hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._owned: set[int] = set()  # ids of covered parameters owned by a hooked module
        tree = {id(m): m for root in self._modules for m in root.modules()}
        for module in tree.values():
            if self._needs_hook(module):
                self._attach(module)

    @property
    def batch_dim(self) -> int | None:
        return self._batch_dim

    @property
    def parameters(self) -> list[Tensor]:
        """The covered parameters, each once."""
        return list(self._params)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Removes every hook of the engine from its modules; it cannot compute Gramians afterwards.

        Call it before building another engine on the same modules (or use the engine as a context
        manager), so that hooks do not pile up. Closing twice is harmless.
        """
        self._closed = True  # the hooks go inert at once; a compile under way delays removal
        for handle in self._handles:
            remove_hook(handle)
        self._handles.clear()
        self._pending = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Records the calls of every module that owns a covered parameter (discovery mode).

        Needed only for an engine built from ``parameters`` alone; harmless otherwise. It may stay
        open across other code (an optimizer's backward-then-step keeps it open between steps).
        """
        remove_deferred_hooks()
        self._pending = None
        self._check_open()
        if self._modules or all(id(p) in self._owned for p in self._params if p.requires_grad):
            yield  # every owner is known and hooked: nothing to discover
            return
        # Dynamo gives up on (and remembers) a compiled forward that runs a global hook it must not
        # trace; so the discovery pass runs compiled code eagerly, and later passes, with a hook on
        # each owner, compile as usual.
        registered, turn_off = guarded(self._discover)
        hook = torch.compiler.disable(registered)  # type: ignore[no-untyped-call]
        handle = nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
        _DISCOVERY_HOOK_IDS.add(handle.id)
        try:
            with _DISCOVERING:
                yield
        finally:
            turn_off()
            remove_hook(handle)
            _DISCOVERY_HOOK_IDS.discard(handle.id)

    def _needs_hook(self, module: nn.Module) -> bool:
        return self._owns_covered(module) or mixes_instances(module) or _is_batch_norm(module)

    def _attach(self, module: nn.Module) -> None:
        # First among the module's hooks: the call as the module made it, before another hook
        # replaces its output or (fully_shard) swaps its parameters.
        hook = _ModuleHook(self._eager_hook)
        handle = module.register_forward_hook(hook, with_kwargs=True, prepend=True)
        self._handles.append(handle)
        self._hook_ids.add(handle.id)
        self._hooked.add(module)
        self._owned.update(
            id(p) for p in module.parameters(recurse=False) if id(p) in self._param_ids
        )

    def _discover(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """The global hook of :meth:`capture`: hooks each new relevant module and records the call.

        Later calls go through the module's own hook, so once every covered parameter's owner is
        known, :meth:`capture` installs no global hook (a compiled model then compiles: dynamo
        cannot compile a forward that runs a global hook dynamo must not trace).
        """
        if module in self._hooked or hooks_are_suspended() or not self._needs_hook(module):
            return
        self._attach(module)
        self._hook(module, args, kwargs, output)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "This engine was closed (its hooks are removed); build a new Engine to compute "
                "Gramians again."
            )

    def _warn_if_uncovered(self, module: nn.Module) -> None:
        """A module whose parameters changed since the engine saw it (``weight_norm``,
        ``parametrize`` with ``right_inverse``) may hold parameters the engine does not cover."""
        new = [
            name
            for name, p in module.named_parameters()
            if p.requires_grad and id(p) not in self._param_ids
        ]
        if new:
            warn(
                f"{type(module).__name__} has parameters the engine was not built with ({new}; "
                "added by a parametrization or weight_norm after the engine was built, for "
                "example): the Gramian leaves them out. Build a new Engine after changing the "
                "model's parameters."
            )

    def _owns_covered(self, module: nn.Module) -> bool:
        # The slots themselves (module.parameters() costs several times more, at every call).
        ids = self._param_ids
        return any(p is not None and id(p) in ids for p in module._parameters.values())

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._closed or hooks_are_suspended():
            return
        self._pending = None
        if _is_sparse_table(module):
            self._sparse_params.add(id(module.weight))
        if self._batch_dim is None:
            return
        # Keyed on the module's class and parameter names too: parametrizing a layer after its
        # first call (parametrize, weight_norm) changes both, and its closed form no longer holds.
        signature = (type(module), tuple(module._parameters))
        known = self._rules.get(module)
        if known is None or known[0] != signature:
            if known is not None:
                self._warn_if_uncovered(module)
            owns = self._owns_covered(module)
            rule = closed_form_rule(module) if owns else None
            known = (signature, owns or _is_batch_norm(module), rule)
            self._rules[module] = known
        _, _, rule = known
        # Per call, not from the cache: a call through torch.func.functional_call (fast weights,
        # LoRA) holds other tensors in the parameter slots than the module's own.
        owns = self._owns_covered(module)
        if rule is not None and not self._called_as_declared(module):
            rule = None
        if owns or _is_batch_norm(module):
            record_call(module, rule, args, kwargs, output)

    def _called_as_declared(self, module: nn.Module) -> bool:
        """Whether this call of ``module`` is its class's stock computation on its own parameters,
        as the closed form assumes: no tensor computed from others in a parameter slot
        (``functional_call`` with derived weights, weight dropout), no ``forward`` patched on the
        instance, and no other forward hook (but another engine's) before the engine's, which
        could change the output the engine sees."""
        if any(t is not None and t.grad_fn is not None for t in module._parameters.values()):
            return False
        if "forward" in module.__dict__ or "_conv_forward" in module.__dict__:
            return False
        # Global forward hooks run before the module's own (only the engines' discovery ones
        # are known not to change the output).
        if any(h not in _DISCOVERY_HOOK_IDS for h in nn.modules.module._global_forward_hooks):
            return False
        for hook_id, hook in module._forward_hooks.items():
            if hook_id in self._hook_ids:
                return True
            if not isinstance(hook, _ModuleHook):  # another engine's hook only records the call
                return False
        return True

    # ------------------------------------------------------------------ Gramian

    def compute_gramian(self, output: Tensor) -> Tensor:
        """The generalized Gramian of ``output``'s Jacobian, ``[*output.shape, *reversed(shape)]``.

        Entry ``[i..., j...]`` is the inner product of the gradients of ``output[i...]`` and
        ``output[j...]`` w.r.t. the covered parameters (a 0-d output gives the squared gradient
        norm). The graph is retained, so ``output.backward(weights)`` works afterwards; or call
        :meth:`backward` to fill ``.grad`` from what this pass saved.
        """
        return self._gramian(output, scaled=False)[0]

    def compute_scaled_gramian(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(G', s)``: the Gramian ``G'`` of ``J / s`` and the power of two ``s``.

        ``s`` is 1 (and ``G'`` is :meth:`compute_gramian`'s result, bit for bit) unless the
        Jacobian's entries lie beyond ``2^±30``, where the Gramian of ``J`` itself could underflow
        or overflow (float32 losses scaled by 1e-22 or 1e20). Scale-invariant weightings give the
        same weights on ``G'``; ``s² G'`` is the Gramian of ``J``. ``s`` is a 0-d float64 tensor;
        nothing is synchronised with the host. :meth:`backward` works afterwards as usual.
        """
        gramian, scale = self._gramian(output, scaled=True)
        assert scale is not None
        return gramian, scale

    def _gramian(self, output: Tensor, scaled: bool) -> tuple[Tensor, Tensor | None]:
        terms = [term for _, term in self.compute_terms(output)]
        assert self._pending is not None
        try:
            dtype = torch.promote_types(output.dtype, torch.float32)
            shape, batch_dim = self._pending.shape, self._pending.batch_dim
            if scaled:
                return scaled_gramian_from_terms(terms, shape, batch_dim, dtype=dtype)
            return gramian_from_terms(terms, shape, batch_dim, dtype=dtype), None
        except BaseException:
            self._pending = None
            raise

    def compute_terms(self, output: Tensor) -> list[tuple[Tensor, Term]]:
        """The Gramian pass without the sum: one ``(parameter, term)`` per covered parameter.

        :meth:`compute_gramian` is the sum of the terms' Gramians, in ``output``'s layout. A term
        keeps its parameter's per-row gradients in factored form (for ``Linear``, the inputs and
        output gradients), rows instance-major with a batch dim (``output``'s flat order
        without), so the terms of several batches can be combined before summing (as
        :mod:`jdoptim.distributed` does across ranks). :meth:`backward` works afterwards.
        """
        self._pending = None
        self._check_open()
        try:
            return self._compute_terms(output)
        except RuntimeError as error:
            self._pending = None
            if "second time" in str(error) or "already been freed" in str(error):
                raise RuntimeError(_FREED_GRAPH_HINT) from error
            if "donated buffers" in str(error):
                raise ValueError(_DONATED_BUFFERS_HINT) from error
            raise
        except BaseException:
            self._pending = None
            raise

    def _compute_terms(self, output: Tensor) -> list[tuple[Tensor, Term]]:
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be a torch.Tensor, got {type(output).__name__}.")
        if not output.is_floating_point():
            raise TypeError(f"output must have a floating-point dtype, got {output.dtype}.")
        if not output.requires_grad:
            raise ValueError(
                "output does not require grad: compute it from the covered modules with gradients "
                "enabled (not under torch.no_grad()) and before detaching it."
            )
        shape = tuple(output.shape)
        rows = math.prod(shape)
        if rows == 0:
            raise ValueError(f"output has no entries (shape {shape}); nothing to differentiate.")
        batch_dim = self._normalized_batch_dim(output)
        covered = {id(p): p for p in self._params if p.requires_grad}
        _check_real(covered.values())
        if batch_dim is None:
            _check_visible(walk_graph(output, covered))
            terms = exact_terms(output, list(covered.values()), instance_major_order(shape, None))
        else:
            terms = self._batched_terms(output, batch_dim, covered)
        if not terms:
            raise NotDifferentiableError(
                "output does not depend on any parameter covered by the engine: check that it was "
                "computed by the modules given to the Engine (and for Engine(parameters=...), "
                "inside `with engine.capture():`)."
            )
        terms = [
            (p, replace(t, sparse=True))
            if id(p) in self._sparse_params and isinstance(t, MaterializedTerm)
            else (p, t)
            for p, t in terms
        ]
        self._pending = _Pending(terms, shape, batch_dim)
        self._last_routes = {id(param): term.route for param, term in terms}
        self._last_report = [_report_only(param, term) for param, term in terms]
        return terms

    def route_report(self) -> list[RouteReport]:
        """Per covered parameter, how the last Gramian pass computed its part (empty before one).

        Names are qualified as in the first given module that holds the parameter
        (``model.named_parameters()``); an engine built from ``parameters`` alone names them
        ``parameters[i]`` (their index in :attr:`parameters`).
        """
        owners: dict[int, tuple[str, str]] = {}
        for prefix, owner in self._named_modules().values():
            for local, held in owner.named_parameters(recurse=False):
                qualified = f"{prefix}.{local}" if prefix else local
                owners.setdefault(id(held), (qualified, type(owner).__name__))
        index = {id(p): i for i, p in enumerate(self._params)}
        reports = []
        for param, route, form, positions, costs in self._last_report:
            name, module = owners.get(id(param), (f"parameters[{index.get(id(param))}]", ""))
            reports.append(
                RouteReport(
                    name=name,
                    module=module,
                    shape=tuple(param.shape),
                    route=route,
                    form=form,
                    positions=positions,
                    pairwise_cost=None if costs is None else costs[0],
                    materialized_cost=None if costs is None else costs[1],
                )
            )
        return reports

    def _normalized_batch_dim(self, output: Tensor) -> int | None:
        if self._batch_dim is None:
            return None
        if output.ndim == 0:
            raise ValueError(
                f"The engine has batch_dim={self._batch_dim} but output is a scalar; pass a tensor "
                "with one entry per instance (e.g. losses with reduction='none'), or build the "
                "engine with batch_dim=None."
            )
        if not -output.ndim <= self._batch_dim < output.ndim:
            raise ValueError(
                f"batch_dim={self._batch_dim} is out of range for output of shape "
                f"{tuple(output.shape)}; it must be in [{-output.ndim}, {output.ndim - 1}]."
            )
        return self._batch_dim % output.ndim

    def _batched_terms(
        self, output: Tensor, batch_dim: int, covered: dict[int, Tensor]
    ) -> list[tuple[Tensor, Term]]:
        plan = walk_graph(output, covered)
        try:
            _check_visible(plan)
            self._warn_fused(plan)
            self._warn_mixing(plan)
            return BatchedPass(output, batch_dim, covered, plan, self._probe_generator).terms()
        finally:
            for record in plan.records:
                record.reached_outputs = []  # these edges point back at the nodes holding the record

    # ------------------------------------------------------------------ fused .grad

    def backward(self, weights: Tensor) -> None:
        """Adds ``Σᵢ wᵢ ∂output_i/∂θ`` to ``.grad`` of every covered parameter ``θ``.

        Equivalent to ``output.backward(weights)`` for the covered parameters, for the ``output``
        of the last :meth:`compute_gramian`, but built from what that pass saved (activations and
        output gradients, per-instance gradients) instead of a second backward pass. Valid once per
        :meth:`compute_gramian`.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "Engine.backward(weights) is valid once after each compute_gramian(output); call "
                "compute_gramian first (a forward pass in between also discards the saved state)."
            )
        if not isinstance(weights, Tensor) or tuple(weights.shape) != pending.shape:
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(
                f"weights must be a tensor of the output's shape {pending.shape}, got {got}."
            )
        grad_from_terms(pending.terms, weights, pending.batch_dim)

    def _warn_mixing(self, plan: GraphPlan) -> None:
        """Batch statistics (BatchNorm in training mode) make the losses depend on every instance:
        the probes send the layers this reaches (those before the norm) to the exact route, so the
        Gramian stays the per-instance losses' own. Said once per layer, naming it."""
        synced = [m for m in plan.mixing_modules if isinstance(m, nn.SyncBatchNorm) and _syncs(m)]
        if synced:
            raise ValueError(
                "SyncBatchNorm shares batch statistics across ranks, so each rank's losses depend "
                "on every rank's instances, which the per-rank Jacobians cannot follow. Put it in "
                "eval() mode, or replace it by BatchNorm (per-rank statistics), GroupNorm or "
                "LayerNorm."
            )
        new = [m for m in plan.mixing_modules if id(m) not in self._warned]
        if not new:
            return
        self._warned.update(id(m) for m in new)
        names = self._module_names(new)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warn(
            f"{shown} {'mixes' if len(new) == 1 else 'mix'} the instances of a batch (batch "
            f"statistics), so the losses are not independent per instance as "
            f"batch_dim={self._batch_dim} declares: the trainable layers before "
            f"{'it' if len(new) == 1 else 'them'}, if any, take the exact route (correct, about "
            "one backward pass per loss). The losses stay per instance (micro-batches and ranks "
            "are joined along batch_dim). For the fast routes, put the layer in eval() mode or "
            "replace it by GroupNorm/LayerNorm."
        )

    def _module_names(self, modules: list[nn.Module]) -> list[str]:
        """``Kind 'qualified.name'`` of each module, as in the first given module holding it (an
        engine watching every module, as the optimizers' without ``modules=``, has no names:
        ``BatchNorm1d(4)``, by its features)."""
        named = self._named_modules()
        return [
            f"{type(m).__name__} {named[id(m)][0]!r}"
            if named.get(id(m), ("", m))[0]
            else f"{type(m).__name__}({getattr(m, 'num_features', '')})"
            for m in modules
        ]

    def _named_modules(self) -> dict[int, tuple[str, nn.Module]]:
        """Each module under the given ones, by id, with its first qualified name there."""
        named: dict[int, tuple[str, nn.Module]] = {}
        for root in self._modules:
            for prefix, module in root.named_modules(remove_duplicate=False):
                named.setdefault(id(module), (prefix, module))
        return named

    def _warn_fused(self, plan: GraphPlan) -> None:
        for module in plan.fused_modules:
            if id(module) not in self._warned:
                self._warned.add(id(module))
                warn(
                    f"{type(module).__name__} ran inside a compiled region fused with the operations "
                    "before it, so the engine cannot see its call on its own: its parameters take "
                    "the exact route (correct, slower). Compile the model without fullgraph, or "
                    "this module outside the compiled region."
                )


def _report_only(param: Tensor, term: Term) -> _Reported:
    """What :meth:`Engine.route_report` needs of a term (shapes only, none of its tensors)."""
    if isinstance(term, OuterTerm):
        return param, term.route, term.form, term.a.shape[2], term.costs()
    return param, term.route, term.form, None, None


def _check_visible(plan: GraphPlan) -> None:
    if plan.opaque_nodes:
        raise ValueError(
            f"The graph of output contains {plan.opaque_nodes[0]} (torch.utils.checkpoint with "
            "use_reentrant=True), whose backward pass hides the parameters inside it from "
            "autograd.grad. Use checkpoint(..., use_reentrant=False)."
        )


def _is_sparse_table(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and module.sparse


def _syncs(norm: nn.SyncBatchNorm) -> bool:
    """Whether a SyncBatchNorm shares its statistics across ranks: in training mode, in a process
    group (its own, else the default one) of several ranks."""
    distributed = torch.distributed
    if not (norm.training and distributed.is_available() and distributed.is_initialized()):
        return False
    return bool(distributed.get_world_size(norm.process_group) > 1)


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _flatten_modules(items: tuple[nn.Module | Iterable[nn.Module], ...]) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for item in items:
        if isinstance(item, nn.Module):
            modules.append(item)
            continue
        if isinstance(item, Tensor) or not isinstance(item, Iterable):
            raise TypeError(
                f"Engine takes modules or iterables of modules, got {type(item).__name__}; pass "
                "parameters with Engine(batch_dim=..., parameters=...)."
            )
        for module in item:
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Engine takes modules, got {type(module).__name__} in an iterable."
                )
            modules.append(module)
    return modules


#: The ids of the engines' own global forward hooks (:meth:`Engine.capture`).
_DISCOVERY_HOOK_IDS: set[int] = set()


class _Discovering:
    """While any engine discovers, compiled code runs eagerly.

    Dynamo gives up on (and remembers) a compiled forward that runs a global hook it must not
    trace, so discovery passes run eagerly and later passes, with a hook on each owner, compile.
    The stance is process-wide and discovery contexts of several engines may open and close in any
    order (an optimizer keeps one open between backward-then-step calls), so they are counted: set
    when the first opens, restored when the last closes.
    """

    def __init__(self) -> None:
        self._open = 0
        self._restore: Any = None

    def __enter__(self) -> None:
        self._open += 1
        if self._open == 1:
            self._restore = torch.compiler.set_stance("force_eager")  # applied by the call

    def __exit__(self, *exc: object) -> None:
        self._open -= 1
        if self._open == 0:
            self._restore.__exit__(None, None, None)


_DISCOVERING = _Discovering()


class _ModuleHook:
    """An engine's forward hook on one module. A copy of the module (``copy.deepcopy``, pickle,
    ``torch.save(model)``) gets an :class:`_InertHook` in its place: the engine belongs to the
    original's optimizer, so it is neither copied along nor told about the copy's calls."""

    __slots__ = ("_call",)

    def __init__(self, call: Callable[..., None]) -> None:
        self._call = call

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._call(module, args, kwargs, output)

    def __reduce__(self) -> tuple[type[_InertHook], tuple[()]]:
        return _InertHook, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        return _InertHook()


class _InertHook:
    """What a copied module holds where the original holds an engine's hook: nothing happens."""

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        return None


def _check_real(params: Iterable[Tensor]) -> None:
    """Complex parameters are refused: the inner products of their gradients would need the real
    and imaginary parts as separate coordinates, which no route computes."""
    for p in params:
        if p.is_complex():
            raise TypeError(
                f"The engine covers real parameters only; got a {p.dtype} parameter of shape "
                f"{tuple(p.shape)}. Keep its real and imaginary parts as two real parameters "
                "(torch.view_as_complex in the forward pass), or leave it out of the engine "
                "(Engine(parameters=...))."
            )
