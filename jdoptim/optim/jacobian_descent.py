"""``JacobianDescent``: Jacobian descent around any ``torch.optim.Optimizer``, as an optimizer.

Two ways to drive it, as with any torch optimizer:

* ``step(closure)``: the closure returns the losses; the step computes the Gramian (or Jacobian),
  the weights and ``.grad``, then lets the wrapped optimizer update.
* backward-then-step: ``optimizer.backward(losses)`` fills ``.grad`` from losses of the user's own
  forward pass (several calls accumulate micro-batches exactly), then ``optimizer.step()``.

The kind of method decides the path (:mod:`jdoptim.paths`), chosen once here;
:mod:`jdoptim.distributed` wraps it when the forward runs on several ranks.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from jdoptim._compile_config import allow_several_backward_passes
from jdoptim._errors import NotDifferentiableError
from jdoptim._grad_layout import lay_out_grads
from jdoptim._stateful import Stateful
from jdoptim._step_info import StepAware, StepInfo
from jdoptim._warnings import warn
from jdoptim.aggregation import Aggregator, GeneralizedWeighting, WeightedAggregator, Weighting
from jdoptim.autogram import Engine
from jdoptim.autojac import clear_jac
from jdoptim.distributed import across_ranks, any_sharded
from jdoptim.optim._delegation import global_step_hooks_held, inner_or, set_inner_or, wrapped
from jdoptim.optim._grad_hooks import post_accumulate_hooks_held, run_post_accumulate_hooks
from jdoptim.optim._loss_scale import grad_scaler_scale, multiplied_by, smallest_scale
from jdoptim.optim._state import (
    JD_STATE_KEY,
    check_groups_match,
    check_method_type,
    holds_nothing,
    jd_state_of,
    split_legacy_state_dict,
)
from jdoptim.optim._untrained import CHECKED_STEPS, UntrainedLeaves
from jdoptim.optim._window import AccumulationWindow, DifferentiatedLosses, GradSnapshot
from jdoptim.paths import (
    NonFiniteGramianError,
    NonFiniteLossesError,
    StepContext,
    StepRecord,
    check_losses,
    make_path,
    resolve_method,
)

Closure = Callable[[], Any]
_FAILED = object()


class JacobianDescent(Optimizer):
    """Wraps ``optimizer`` so that each step follows a Jacobian-descent direction.

    The losses are ``[B]`` per instance, ``[T]`` per task, ``[B, T]`` for both (a scalar loss gives
    a plain gradient step, with a warning). ``step(closure)`` or ``backward(losses)`` fills
    ``.grad`` with the combination of the losses' gradients chosen by the method; the wrapped
    optimizer updates from it. The two share ``param_groups`` and ``state``, so LR schedulers,
    ``add_param_group``, hooks and ``state_dict`` work as usual.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance; it makes the update from ``.grad``.
        weighting: a :class:`~jdoptim.aggregation.Weighting` (or generalized weighting). Gramian
            weightings run on the autogram engine with ``batch_dim``; matrix weightings on
            autojac; cross-Gramian weightings (SDMGrad, MoDo) call the closure three times per
            step. Default: UPGrad. ``gramian_weighting=`` is accepted as an alias.
        aggregator: alternatively, an :class:`~jdoptim.aggregation.Aggregator`. Gramian-weighted
            aggregators use the engine with their weighting; the others get the full Jacobian.
        scalarizer: alternatively, a scalarizer from :mod:`jdoptim.scalarization`.
        batch_dim: the losses' instance dimension, when loss ``i`` depends on instance ``i`` only
            (no BatchNorm in train mode): enables the engine's fast instance-wise path, and makes
            micro-batches (and ranks) concatenate along it. ``None`` (default): the losses are per
            task, exact for any model, and micro-batches add up.
        modules: modules whose parameters the engine covers; by default the engine finds the modules
            owning the optimizer's parameters while the forward pass runs. Also the way to name a
            ``DistributedDataParallel`` model up front.
        shared_params: multi-task mode. The losses come with the shared trunk's output
            (``(losses, features)`` from the closure, or ``backward(losses, features=...)``): shared
            parameters get the combined direction, each task's parameters its own loss's gradient.
        tasks_params: in multi-task mode, one iterable of parameters per task (default: inferred).
        fuse_backward: build ``.grad`` from what the engine's Gramian pass saved (no second
            backward). ``False`` backpropagates the weighted losses instead; both are exact.
        parallel_chunk_size: rows per batched backward on the autojac paths (``None``: all).
        grad_scaler: a ``torch.amp.GradScaler`` for float16: ``step(closure)`` scales the losses,
            forms the Gramian from unscaled values, and updates through ``grad_scaler.step`` and
            ``update`` (an overflowing step is skipped and the scale backed off). Backward-then-
            step alike: ``backward`` takes the losses scaled by the scaler or not (then scaled),
            and a plain ``step()`` goes through the scaler (or call ``scaler.step(optimizer)``
            and ``scaler.update()`` yourself, as in torch).
        process_group: distributed mode (:mod:`jdoptim.distributed`): each step is exact on the
            losses of every rank of this group. Found automatically from a
            ``DistributedDataParallel`` model run in the forward pass; ``process_group=False``
            turns that off (each rank then steps on its own losses).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        weighting: Weighting | GeneralizedWeighting | None = None,
        aggregator: Aggregator | None = None,
        scalarizer: nn.Module | None = None,
        batch_dim: int | None = None,
        modules: nn.Module | Iterable[nn.Module] | None = None,
        shared_params: Iterable[Tensor] | None = None,
        tasks_params: Sequence[Iterable[Tensor]] | None = None,
        fuse_backward: bool = True,
        parallel_chunk_size: int | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: dist.ProcessGroup | bool | None = None,
        gramian_weighting: Weighting | GeneralizedWeighting | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance (such as SGD(params)), got "
                f"{type(optimizer).__name__}."
            )
        if isinstance(optimizer, JacobianDescent):
            raise TypeError("optimizer is already a JacobianDescent; wrap the inner optimizer.")
        if _step_needs_a_closure(optimizer):
            raise TypeError(
                f"{type(optimizer).__name__}.step needs a closure that re-evaluates the loss (a "
                "line search): Jacobian descent gives it one direction per step, from .grad. Wrap "
                "an optimizer that updates from .grad alone (SGD, Adam, RMSprop...)."
            )
        if gramian_weighting is not None:
            if weighting is not None:
                raise ValueError("gramian_weighting= is an alias of weighting=; give only one.")
            weighting = gramian_weighting
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"batch_dim must be an int or None, got {type(batch_dim).__name__}.")
        if grad_scaler is not None and not all(
            callable(getattr(grad_scaler, name, None))
            for name in ("scale", "unscale_", "step", "update", "is_enabled")
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        self._method = resolve_method(weighting, aggregator, scalarizer)
        self._modules = None if modules is None else _as_module_list(modules)
        shared = None if shared_params is None else list(shared_params)
        per_task = None if tasks_params is None else [list(params) for params in tasks_params]
        # What copy.deepcopy and pickle rebuild the optimizer from (see __getstate__).
        self._options: dict[str, Any] = {
            "weighting": weighting,
            "aggregator": aggregator,
            "scalarizer": scalarizer,
            "batch_dim": batch_dim,
            "modules": self._modules,
            "shared_params": shared,
            "tasks_params": per_task,
            "fuse_backward": fuse_backward,
            "parallel_chunk_size": parallel_chunk_size,
            "grad_scaler": grad_scaler,
            "process_group": process_group,
        }
        self.batch_dim = batch_dim
        self.fuse_backward = fuse_backward
        self.parallel_chunk_size = parallel_chunk_size
        self.grad_scaler = grad_scaler
        self._engine: Engine | None = None
        # Closes the engine (its hooks leave the model) when replaced or when this is collected.
        self._close_engine: weakref.finalize[[], Any] | None = None
        self._engine_key: tuple[int, ...] = ()
        self._steps = 0
        self.last_step: StepRecord | None = None
        """What the last step computed: losses, weights, Gramian and a conflict summary."""
        self._window = AccumulationWindow()
        self._differentiated = DifferentiatedLosses()
        self._backward_calls = 0
        #: The last GradScaler scale recognised in the losses' graph (followed as it backs off).
        self._loss_scale_seen: float | None = None
        self._warned: set[str] = set()
        # Optimizer.__init__ installs the step hooks and profiling; param_groups, state and defaults
        # are properties delegating to the wrapped optimizer once it is set below.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        allow_several_backward_passes()
        self.optimizer = optimizer
        if self._modules is not None:
            self._check_modules_cover_params()
        # Weak references: the path's hooks must not keep a dropped optimizer alive.
        myself = weakref.ref(self)
        context = StepContext(
            params=lambda: _alive(myself).params(),
            engine=lambda: _alive(myself)._get_engine(),
            batch_dim=batch_dim,
            fuse_backward=fuse_backward,
            parallel_chunk_size=parallel_chunk_size,
            shared_params=shared,
            tasks_params=per_task,
        )
        path = make_path(self._method, context)
        if grad_scaler is not None and not path.supports_backward():
            raise ValueError(
                "grad_scaler is not supported with cross-Gramian weightings (SDMGrad, MoDo)."
            )
        self._path = across_ranks(path, process_group, self._modules, grad_scaler)
        self._multi_task = shared_params is not None
        self.register_state_dict_post_hook(_add_jd_state)
        self._path.watch_first_forward()

    # --- sharing the wrapped optimizer's bookkeeping -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = inner_or(self, "param_groups", "_init_groups")
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        set_inner_or(self, "param_groups", "_init_groups", value)

    @property
    def state(self) -> Any:
        return inner_or(self, "state", "_init_state")

    @state.setter
    def state(self, value: Any) -> None:
        set_inner_or(self, "state", "_init_state", value)

    @property
    def method(self) -> nn.Module:
        """The weighting, aggregator or scalarizer that combines the losses."""
        return self._method.module

    @property
    def distributed(self) -> Any:
        """The distributed step (``bytes_sent`` of the last step), or ``None`` when local."""
        return getattr(self._path, "distributed", None)

    def params(self) -> list[Tensor]:
        """Every parameter of every group that requires a gradient, in group order, each once (torch
        only warns about a parameter listed twice: counted twice, its gradient would be too)."""
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        return list({id(p): p for p in params}.values())

    # --- step(closure) -------------------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """Updates the parameters; with a closure, computes ``.grad`` by Jacobian descent first.

        ``step(closure)``: the closure returns the losses (``(losses, features)`` in multi-task
        mode) and is called under ``torch.enable_grad()``. The ``.grad`` the update uses is the
        direction of these losses only: whatever the closure left in ``.grad`` (a forgotten
        ``zero_grad``, its own ``backward``) is discarded; a closure whose own ``backward`` freed
        the losses' graph is a ``ValueError``, except torch's closure on a scalar loss, which
        updates from the gradient it computed. With a cross-Gramian weighting the
        closure is called three times per step and must draw the next batch at each call. A
        closure that calls ``optimizer.backward(losses)`` itself (as a trainer's does), or returns
        ``None`` after such a call, makes the step update from that ``.grad``. Returns the losses.
        Nothing changes if the step raises before the update.

        ``step()``: updates from ``.grad`` as filled by :meth:`backward`, like any torch optimizer.
        """
        if closure is None:
            self._step_from_grad()
            return None
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}.")
        with _differentiating():
            return self._step_with_closure(closure)

    def _step_with_closure(self, closure: Closure) -> Tensor | None:
        saved_method_state = self._method.module.state_dict()
        params = self.params()
        before_closure = GradSnapshot(params)
        calls_before = self._backward_calls
        self._path.begin()
        try:
            result: Any = _FAILED  # stays so if the guard holds a closure's error (distributed)
            guard, forward = self._path.guard("the closure"), self._path.forward_context()
            with guard, torch.enable_grad(), forward:
                result = closure()
            if self._backward_calls != calls_before or result is None:
                # The closure ran optimizer.backward (a trainer's closure), or returned nothing
                # after backward() filled .grad: update from .grad, as torch optimizers do.
                self._step_from_grad()
                return None if self.last_step is None else self.last_step.losses
            backpropagated = before_closure.accumulated(params)
            if backpropagated and isinstance(result, Tensor) and result.ndim == 0:
                # torch's closure (loss.backward(); return loss): the step of one loss is its
                # gradient, which .grad holds; its graph is gone, so nothing else could be done.
                self._warn_once("scalar-closure-backward", _SCALAR_CLOSURE_BACKWARD)
                self._step_from_grad(warn=False)
                return result.detach()
            self._discard_closure_grads(params, before_closure, backpropagated)
            kept = GradSnapshot(params)  # the closure's zeros, if kept
            try:
                with post_accumulate_hooks_held(params):
                    record = self._run(result, closure)
            except RuntimeError as error:
                if backpropagated and "freed" in str(error):
                    raise ValueError(_CLOSURE_FREED_GRAPH) from error
                raise
        except BaseException:
            self._method.module.load_state_dict(saved_method_state)
            for param, grad in zip(params, before_closure.grads, strict=True):
                param.grad = grad
            clear_jac(params)
            raise
        self.last_step = record
        lay_out_grads(params)
        if record.finite:
            run_post_accumulate_hooks(
                [
                    param
                    for index, param in enumerate(params)
                    if param.grad is not None
                    and (param.grad is not kept.grads[index] or kept.edited_in_place(index, param))
                ]
            )
        with self._method_state_restored_on_error(saved_method_state):
            self._update()
            self._window.clear()
            if record.finite:
                self._steps += 1
                self._notify_after_step(record.losses, closure)
        return record.losses

    @contextmanager
    def _method_state_restored_on_error(self, saved: dict[str, Any]) -> Iterator[None]:
        """The update and ``after_step``: if either raises, the method's state and the step count
        go back to before the step. Parameters and the wrapped optimizer's state changed by its
        ``step()`` stay changed (a torch optimizer's update cannot be undone)."""
        steps = self._steps
        try:
            yield
        except BaseException:
            self._method.module.load_state_dict(saved)
            self._steps = steps
            raise

    def _run(self, first_result: Any, closure: Closure) -> StepRecord:
        def next_losses() -> Tensor:
            with torch.enable_grad(), self._path.forward_context():
                losses, _ = self._checked(closure())
            return losses

        losses: Any = None
        features: Any = None
        overflowed: Tensor | None = None
        scale = 1.0
        with self._path.guard("the closure's losses"):
            if first_result is _FAILED:
                raise RuntimeError("the closure failed")  # never raised: the guard holds its error
            try:
                losses, features = self._checked(first_result)
            except NonFiniteLossesError:
                if self.grad_scaler is None:
                    raise
                overflowed = check_losses(first_result, self._multi_task, finite=False)[0]
                # The scaler must have a scale to back off, even on a first step that overflows.
                self._loss_scale(overflowed)
            else:
                scale = self._loss_scale(losses)
        if overflowed is not None:
            self._path.overflowed(overflowed)  # across ranks: every rank skips this step
            return self._skip_step(overflowed)
        untrained = self._untrained_leaves(losses)
        try:
            with _full_precision(losses), _reworded_not_differentiable():
                record = self._path.run(losses, features, scale, next_losses)
        except NonFiniteGramianError:
            if self.grad_scaler is None:
                raise
            return self._skip_step(losses)
        self._warn_untrained(untrained)
        return record

    def _untrained_leaves(self, losses: Tensor | None) -> UntrainedLeaves | None:
        """On the first steps, the leaves ``losses`` reach that this optimizer does not train
        (``None`` losses: a rank whose closure failed, the step's exchanges raise for all)."""
        if self._steps >= CHECKED_STEPS or "untrained-leaves" in self._warned:
            return None
        if not isinstance(losses, Tensor) or not losses.requires_grad:
            return None
        trained = [param for group in self.param_groups for param in group["params"]]
        if any_sharded(trained):
            return None  # the graph's leaves are the unsharded copies
        return UntrainedLeaves(losses, trained)

    def _warn_untrained(self, untrained: UntrainedLeaves | None) -> None:
        message = None if untrained is None else untrained.message(type(self).__name__)
        if message is not None:
            self._warn_once("untrained-leaves", message)

    def _discard_closure_grads(
        self, params: list[Tensor], before: GradSnapshot, changed: bool
    ) -> None:
        """Clears what the closure left in ``.grad``, except zeros (``zero_grad(set_to_none=False)``
        in the closure or before the step): a parameter the losses do not reach keeps a zero
        ``.grad``, as in torch, so momentum and weight decay still move it."""
        if changed:
            self._warn_once(
                "closure-backward",
                "The closure computed gradients itself (it called backward()); step(closure) "
                "fills .grad by Jacobian descent and discards them. Return the losses without "
                "calling backward, or use optimizer.backward(losses) then optimizer.step().",
            )
        zeros = before.untouched_zeros(params)  # zeroed before the step, untouched since
        for index, param in enumerate(params):
            # Zeroed in place by the closure (known zero: nothing accumulated, which read it).
            zeroed = not changed and before.edited_in_place(index, param)
            if not zeroed and index not in zeros:
                param.grad = None

    # --- backward-then-step --------------------------------------------------------------------

    def backward(self, losses: Any, *, features: Any = None) -> StepRecord:
        """Fills ``.grad`` by Jacobian descent from losses of a forward pass you ran yourself.

        ``.grad`` then holds the direction for every loss passed to ``backward`` since the last
        :meth:`step` or :meth:`zero_grad` (the concatenation of the micro-batches along
        ``batch_dim``, or, per task, their sum), plus whatever ``.grad`` held before the first of
        them: calling it on ``k`` micro-batches and stepping once is exactly the step on the whole
        batch. Clip, unscale or inspect ``.grad`` between this and :meth:`step`.

        The engine must see the forward pass: with ``modules=`` it always does; otherwise it
        watches module calls from the optimizer's construction on (a forward run before the
        optimizer was built takes an exact but slower route). With a ``GradScaler``, pass
        ``scaler.scale(losses)``: the weights are computed on the unscaled losses (recognised in their
        graph, or from ``grad_scaler=``), and an overflowing step leaves non-finite ``.grad`` for the
        scaler to skip. As with ``loss.backward()``, each losses
        tensor can be given once (a second time raises). Returns :attr:`last_step`.
        """
        with _differentiating():
            return self._backward(losses, features)

    def _backward(self, losses: Any, features: Any) -> StepRecord:
        given = losses if features is None else (losses, features)
        self._differentiated.check(losses)
        given_losses = losses
        try:
            losses, features = self._checked(given)
        except NonFiniteLossesError:
            # Under a GradScaler this is an overflow to skip: non-finite .grad, and step() refuses.
            overflowed = check_losses(given, self._multi_task, finite=False)[0]
            self._loss_scale(overflowed)  # a scaler given, it has a scale to back off
            self._note_loss_scale(given_losses)  # follows a scaler backing off step after step
            self._path.begin()
            self._path.overflowed(overflowed)  # across ranks: every rank skips this step
            self._window.clear()
            self._window.finite = False
            self.last_step = self._skip_step(overflowed)
            self._backward_calls += 1
            self._differentiated.add(given_losses)
            return self.last_step
        self._path.begin()
        self._path.start_watching()
        params = self.params()
        window = self._window
        # What the method holds now (after this window's earlier backward calls): restored if
        # this call raises, as everything else.
        saved_method_state = copy.deepcopy(self._method.module.state_dict())
        opened = not window.resume(params)
        if opened:
            window.open(params)
            window.method_state = saved_method_state
        elif window.method_state is not None:
            # The method weighs the window's micro-batches together, once, from its state when
            # the window opened: its state moves as in one step on the whole batch, not once
            # per micro-batch.
            self._method.module.load_state_dict(copy.deepcopy(window.method_state))
        scale = self._loss_scale(losses)
        scale = self._note_loss_scale(given_losses) or scale
        if scale != 1.0 and self._given_unscaled(given_losses):
            unscaled = losses  # .grad gets the scaler's scale all the same, as step() unscales it
        else:
            unscaled = losses / scale if scale != 1.0 else losses
        untrained = self._untrained_leaves(losses)
        with post_accumulate_hooks_held(params):
            with _full_precision(losses), _reworded_not_differentiable():
                part = self._path.differentiate(unscaled, features, scale)
            parts = [*window.parts, part]
            for param in params:
                param.grad = None
            try:
                with _full_precision(losses):
                    combined = self._path.combine(parts)
                    try:
                        record = self._path.apply(combined)
                    except NonFiniteGramianError:
                        record = self._skip_step(combined.losses)
                # The parameters this backward reached (their hooks run, as after autograd's).
                reached = [param for param in params if param.grad is not None]
            except BaseException:
                self._method.module.load_state_dict(saved_method_state)
                window.restore(params)
                raise
        if record.finite:
            window.parts = parts
            window.finite = window.base_finite
            if opened:
                # After the step's exchanges: every rank takes part (distributed steps average
                # the base over the ranks, as DDP would have).
                window.base = self._path.shared_base(window.base, params)
            window.write(params)
            run_post_accumulate_hooks(reached)
            self._warn_untrained(untrained)
        else:  # skipped, as for losses that overflow: on every rank alike in distributed steps
            window.clear()
            window.finite = False
        self._backward_calls += 1
        self._differentiated.add(given_losses)
        self.last_step = record
        return record

    def _given_unscaled(self, losses: Any) -> bool:
        """With ``grad_scaler=``: whether ``backward`` got the losses themselves, not
        ``scaler.scale(losses)`` (reshaped, joined or weighted after it, maybe): the scaler's own
        scale tensor is nowhere in their graph. The optimizer then scales them, as
        ``step(closure)`` does, so that ``.grad`` is scaled either way."""
        if self.grad_scaler is None:
            return False  # the scale was found in the losses' graph
        factor = getattr(self.grad_scaler, "_scale", None)
        if not isinstance(factor, Tensor):  # not torch's GradScaler: taken as scaled, as before
            return False
        return not multiplied_by(losses, factor)

    def _note_loss_scale(self, losses: Any) -> float | None:
        """The scale of losses that ``scaler.scale(...)`` returned (no ``grad_scaler`` given),
        recognised in their graph and remembered, so that a scaler backing off is followed."""
        if self.grad_scaler is not None:
            return None
        found = grad_scaler_scale(losses, smallest_scale(self._loss_scale_seen))
        if found is not None:
            self._loss_scale_seen = found
        return found

    def _step_from_grad(self, *, warn: bool = True) -> None:
        window = self._window
        # .grad the given grad_scaler scaled, not stepped through scaler.step(optimizer): as in
        # step(closure), the scaler unscales it, skips an overflow and updates its scale.
        through_scaler = bool(window.parts or not window.finite) and self._scaled_grad_to_step()
        if not window.finite and not through_scaler:
            raise ValueError(
                "A backward() since the last zero_grad() gave non-finite losses, Gramian or .grad "
                "(an overflow, or a diverging model); the update is refused. Under float16, step through a GradScaler "
                "(scaler.step(optimizer)), which skips such steps and lowers the scale."
            )
        if not window.parts and not through_scaler:
            if (
                warn
                and any(p.grad is not None for p in self.params())
                and any(g.get("lr", 1) != 0 for g in self.param_groups)
            ):
                self._warn_once(
                    "no-backward",
                    "step() without a closure updates from .grad, but no optimizer.backward(losses) "
                    "filled it since the last step: this is a plain gradient step, not Jacobian "
                    "descent. Call optimizer.backward(losses) first (or step(closure)).",
                )
            self._step_wrapped()
            return None
        counted = window.finite  # a step the scaler skips moves no count and no method state
        losses = self.last_step.losses if self.last_step is not None else None
        with self._method_state_restored_on_error(self._method.module.state_dict()):
            if through_scaler:
                self._update()
            else:
                self._step_wrapped()
            window.clear()
            if counted:
                self._steps += 1
                if losses is not None:
                    self._notify_after_step(losses, None)
        return None

    def _scaled_grad_to_step(self) -> bool:
        """Whether ``step()`` was called on ``.grad`` of losses the ``grad_scaler`` given scaled,
        not through ``scaler.step(optimizer)`` (which unscales first) nor after ``unscale_``."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return False
        states = getattr(scaler, "_per_optimizer_states", None)
        if states is None:  # another GradScaler: its step is the user's to call
            return False
        state = states.get(id(self))  # not states[...]: the defaultdict would add an entry
        return state is None or bool(state["stage"] is OptState.READY)

    # --- pieces of the step --------------------------------------------------------------------

    def _checked(self, result: Any) -> tuple[Tensor, Any]:
        losses, features = check_losses(result, self._multi_task)
        if losses.ndim == 0 and self._method.needs_several_losses:
            self._warn_once(
                "scalar-loss",
                f"The losses are a scalar, so {self._method.module!r} has nothing to combine and "
                "the step is a plain gradient step. Return one loss per instance (reduction='none') "
                "or per task; silence this with warnings.filterwarnings('ignore', 'The losses are a "
                "scalar').",
            )
        return losses, features

    def _skip_step(self, losses: Tensor) -> StepRecord:
        """An overflowing step under loss scaling: non-finite ``.grad``, for the scaler to skip."""
        for param in self.params():
            param.grad = torch.full_like(param, float("nan"))
        return StepRecord(losses.detach(), finite=False)

    def _update(self) -> None:
        if self.grad_scaler is None:
            self._step_wrapped()
        else:
            with global_step_hooks_held():
                self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def _step_wrapped(self) -> None:
        """The wrapped optimizer's step; torch's global step hooks ran for this one's already."""
        with global_step_hooks_held():
            self.optimizer.step()

    def _loss_scale(self, like: Tensor) -> float:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        # scale() also sets the scaler up on the losses' device, as its step() expects.
        return float(self.grad_scaler.scale(torch.ones((), device=like.device)))

    def _notify_after_step(self, losses: Tensor, closure: Closure | None) -> None:
        listeners = [m for m in _method_parts(self._method.module) if isinstance(m, StepAware)]
        if not listeners:
            return
        lr = self.param_groups[0].get("lr", float("nan"))
        info = StepInfo(
            losses=losses,
            lr=float(lr),
            step=self._steps,
            evaluate=lambda: self._evaluate(closure),
        )
        for listener in listeners:
            listener.after_step(info)

    def _evaluate(self, closure: Closure | None) -> Tensor:
        if closure is None:
            raise TypeError(
                f"{self._method.module!r} re-evaluates the losses after the update, which needs "
                "the closure: use optimizer.step(closure) with this method."
            )
        with torch.no_grad():
            losses = _values(closure())
        return self._path.global_losses(losses)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message, UserWarning)

    def _get_engine(self) -> Engine:
        params = self.params()
        key = tuple(id(p) for p in params)
        if self._engine is None or key != self._engine_key:
            if self._close_engine is not None:
                self._path.stop_watching()
                self._close_engine()
            if self._modules is not None:
                self._engine = Engine(*self._modules, batch_dim=self.batch_dim)
            else:
                self._engine = Engine(batch_dim=self.batch_dim, parameters=params)
            self._close_engine = weakref.finalize(self, self._engine.close)
            self._engine_key = key
        return self._engine

    def _check_modules_cover_params(self) -> None:
        assert self._modules is not None
        covered = {id(p) for module in self._modules for p in module.parameters()}
        missing = [p for p in self.params() if id(p) not in covered]
        if missing:
            raise ValueError(
                f"modules= does not own {len(missing)} of the optimizer's parameters (shapes "
                f"{[tuple(p.shape) for p in missing[:3]]}...). Pass the modules that own all of them, "
                "or leave modules=None to let the optimizer find them."
            )

    # --- torch.optim citizenship ---------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears ``.grad`` as the wrapped optimizer does (its own ``zero_grad``, overrides
        included), and starts a new accumulation window."""
        inner = wrapped(self)
        if inner is None:  # a trainer's wrapper around us, without our __init__
            super().zero_grad(set_to_none)
        else:
            inner.zero_grad(set_to_none)
        clear_jac(self.params())
        self._window.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group to the wrapped optimizer through its own ``add_param_group`` (an override
        that completes or checks groups runs), as it would be added without jdoptim. With
        ``modules=``, the group's parameters must belong to those modules, as at construction
        (the engine watches only them: others would never get a ``.grad``)."""
        inner = wrapped(self)
        if inner is None:  # during Optimizer.__init__, or in a trainer's wrapper around us
            super().add_param_group(param_group)
        else:
            inner.add_param_group(param_group)
            if self._modules is not None:
                try:
                    self._check_modules_cover_params()
                except ValueError:
                    inner.param_groups.pop()  # nothing changes on error
                    raise

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's own ``state_dict()`` (its overrides and hooks included) plus a
        ``"jdoptim"`` entry (:meth:`jd_state_dict`), with this optimizer's state-dict hooks run
        around it as torch runs them."""
        inner = wrapped(self)
        if inner is None:  # a trainer's wrapper around us, without our __init__
            return super().state_dict()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict: dict[str, Any] = inner.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (into a fresh optimizer and method, too).

        The layout is torch's (``state``, ``param_groups``) plus a ``"jdoptim"`` entry with the
        method's state and the step count. This optimizer's load pre-hooks see the whole dict
        first, as in torch; then everything is checked before anything changes, and the wrapped
        optimizer loads its part through its own ``load_state_dict``.
        """
        inner = wrapped(self)
        if inner is None:  # a trainer's wrapper around us, without our __init__
            super().load_state_dict(state_dict)
            return
        state_dict = state_dict.copy()  # as torch: the hooks may edit it, not the caller's dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = split_legacy_state_dict(state_dict)
        check_groups_match(self.optimizer, state_dict)
        jd_state = state_dict.get(JD_STATE_KEY)
        saved_jd_state = self.jd_state_dict()
        if jd_state is not None:
            self.load_jd_state_dict(jd_state)
        elif isinstance(self._method.module, Stateful) or self._steps:
            self._warn_once(
                "no-jd-state",
                "This state dict has no 'jdoptim' entry (torch.distributed.checkpoint keeps only "
                "'state' and 'param_groups'): the wrapped optimizer is restored, the method's state "
                "and the step count are not. With torch.distributed.checkpoint, save and load "
                "jdoptim.distributed.checkpoint_state(model, optimizer) instead (then "
                "load_checkpoint_state); otherwise save optimizer.jd_state_dict() with torch.save "
                "(not through DCP, which loads into a template that holds no method state) and "
                "restore it with optimizer.load_jd_state_dict(...).",
            )
        try:
            inner.load_state_dict({k: v for k, v in state_dict.items() if k != JD_STATE_KEY})
        except BaseException:
            self.load_jd_state_dict(saved_jd_state)
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def jd_state_dict(self) -> dict[str, Any]:
        """jdoptim's own state: the method's state and type, the step count, the ``GradScaler``.

        Taken between two ``backward`` calls of a step, it holds the method's state from before
        that step, with the step count: resuming redoes the whole step.

        :meth:`state_dict` holds it under ``"jdoptim"``; save it separately where only torch's
        ``state`` and ``param_groups`` travel (``torch.distributed.checkpoint``).
        """
        window = self._window
        # Mid-window (between two backward calls of a step), the method's state as the window
        # opened: a resumed run redoes the whole step from it, moving the state once.
        opened = window.method_state if window.parts else None
        jd_state: dict[str, Any] = {
            "method": self._method.module.state_dict() if opened is None else opened,
            "method_type": type(self._method.module).__name__,
            "steps": self._steps,
        }
        if self.grad_scaler is not None:
            jd_state["grad_scaler"] = self.grad_scaler.state_dict()
        if self._loss_scale_seen is not None:
            jd_state["loss_scale_seen"] = self._loss_scale_seen
        return jd_state

    def load_jd_state_dict(self, jd_state: dict[str, Any]) -> None:
        """Restores what :meth:`jd_state_dict` saved; checked first, nothing changes on error."""
        jd_state = jd_state_of({JD_STATE_KEY: jd_state}, type(self).__name__)
        saved = self._method.module.state_dict()
        # Between two methods that hold nothing yet (Mean, and UPGrad before its first step, say)
        # there is nothing to carry over: switching methods keeps the wrapped optimizer's state.
        switching = holds_nothing(jd_state["method"]) and holds_nothing(saved)
        if not switching:
            check_method_type(jd_state, type(self._method.module).__name__)
        try:
            if not switching:
                try:
                    self._method.module.load_state_dict(jd_state["method"])
                except RuntimeError as error:  # torch's missing or unexpected keys
                    raise ValueError(
                        f"The state dict's method state does not fit this optimizer's "
                        f"{self._method.module!r}: load a checkpoint saved with the same method, "
                        f"built the same way (its inner methods included). torch said: {error}"
                    ) from error
            if self.grad_scaler is not None and "grad_scaler" in jd_state:
                self.grad_scaler.load_state_dict(jd_state["grad_scaler"])
        except BaseException:
            self._method.module.load_state_dict(saved)
            raise
        self._steps = int(jd_state["steps"])
        self._loss_scale_seen = jd_state.get("loss_scale_seen")

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: the wrapped optimizer, the options, and
        :meth:`jd_state_dict`. As with torch's optimizers, hooks are not kept; the engine, the last
        step's record and an open accumulation window are not either (the copy starts between two
        steps)."""
        if isinstance(self._options["process_group"], dist.ProcessGroup):
            raise TypeError(
                f"A {type(self).__name__} bound to a process group cannot be copied or pickled: "
                "build one in each process instead."
            )
        return {
            "optimizer": self.optimizer,
            "options": self._options,
            "jd_state": self.jd_state_dict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "options" in state:
            JacobianDescent.__init__(self, state["optimizer"], **state["options"])
            self.load_jd_state_dict(state["jd_state"])
            return
        inner = wrapped(self)
        if inner is not None and {"state", "param_groups"} <= set(state):
            inner.__setstate__({"state": state["state"], "param_groups": state["param_groups"]})
            state = {k: v for k, v in state.items() if k not in ("state", "param_groups")}
        super().__setstate__(state)

    def __repr__(self) -> str:
        options = f"{self._method.kind.value}: {self._method.module!r}, batch_dim={self.batch_dim}"
        return f"{type(self).__name__}({self.optimizer!r}, {options})"


def _add_jd_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(optimizer, JacobianDescent)
    state_dict[JD_STATE_KEY] = optimizer.jd_state_dict()
    return state_dict


@contextmanager
def _reworded_not_differentiable() -> Iterator[None]:
    """The engine's or autojac's error for losses that reach no parameter, in the optimizer's
    words (the user built no Engine and passed no inputs)."""
    try:
        yield
    except NotDifferentiableError as error:
        raise ValueError(
            "The losses do not depend on any of the optimizer's parameters: compute them from "
            "the model whose parameters the optimizer was given, with gradients enabled."
        ) from error


@contextmanager
def _differentiating() -> Iterator[None]:
    """Gradients enabled, outside inference mode: ``backward`` and ``step(closure)`` differentiate
    the losses whatever the caller's mode (torch's ``loss.backward()`` works under ``no_grad``
    and ``inference_mode`` too)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _full_precision(like: Tensor | None) -> AbstractContextManager[Any]:
    """Autocast off while a step differentiates and weighs (a trainer may call us inside a region:
    the Gramian, Jacobian and weights must not be computed in float16)."""
    if like is None:  # a failed closure on this rank: nothing runs but the exchanges
        return nullcontext()
    return torch.autocast(like.device.type, enabled=False)


_SCALAR_CLOSURE_BACKWARD = (
    "The closure called backward() on a scalar loss itself (torch's closure convention): "
    "step(closure) updates from that gradient, a plain gradient step. For Jacobian descent, return "
    "one loss per instance or per task without calling backward."
)
_CLOSURE_FREED_GRAPH = (
    "The closure called backward() on its losses itself, which freed their graph, so step(closure) "
    "cannot differentiate them by Jacobian descent. Return the losses without calling backward "
    "(step(closure) computes .grad from them), or call optimizer.backward(losses) in the closure."
)


def _alive(ref: weakref.ref[JacobianDescent]) -> JacobianDescent:
    optimizer = ref()
    if optimizer is None:
        raise RuntimeError("The optimizer of this step path was garbage-collected.")
    return optimizer


def _values(result: Any) -> Tensor:
    losses = result[0] if isinstance(result, tuple) else result
    if not isinstance(losses, Tensor):
        raise TypeError(f"The closure must return the loss tensor, got {type(losses).__name__}.")
    return losses.detach()


def _as_module_list(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    result = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not result or not all(isinstance(m, nn.Module) for m in result):
        raise TypeError("modules must be a Module or a non-empty iterable of Modules.")
    return result


def _method_parts(module: nn.Module) -> list[nn.Module]:
    parts = [module]
    inner = getattr(module, "weighting", None)
    if isinstance(module, WeightedAggregator) and isinstance(inner, nn.Module):
        parts.append(inner)
    return parts


def _step_needs_a_closure(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step`` must be given a closure (``LBFGS``)."""
    try:
        closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # a step torch cannot inspect: assume it updates from .grad
        return False
    return closure is not None and closure.default is inspect.Parameter.empty
