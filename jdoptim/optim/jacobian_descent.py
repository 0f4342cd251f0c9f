"""``JacobianDescent``: Jacobian descent around any ``torch.optim.Optimizer``, as an optimizer.

``step(closure)`` reads top to bottom as the data path: call the closure for the losses, get the
Gramian (autogram engine) or the Jacobian (autojac), turn it into weights or a direction, fill
``.grad``, and let the wrapped optimizer make the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from jdoptim._step_info import StepAware, StepInfo
from jdoptim.aggregation import (
    Aggregator,
    Flattening,
    GeneralizedWeighting,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from jdoptim.autogram import Engine
from jdoptim.autojac import backward as jac_backward
from jdoptim.autojac import clear_jac, jac, jac_to_grad, mtl_backward
from jdoptim.distributed import DistributedStep, distributed_step_for, watch_ddp
from jdoptim.linalg import check_finite
from jdoptim.optim._method import Method, resolve_method

Closure = Callable[[], Any]


class JacobianDescent(Optimizer):
    """Wraps ``optimizer`` so that each step follows a Jacobian-descent direction.

    The closure returns the losses (``[B]`` per instance, ``[T]`` per task, ``[B, T]`` for both, or a
    scalar for a plain step); ``step(closure)`` fills ``.grad`` with the combination of the losses'
    gradients chosen by the method, then calls the wrapped optimizer's ``step()``. The two share
    ``param_groups`` and ``state``, so LR schedulers, ``add_param_group`` and hooks work as usual.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance; it makes the update from ``.grad``.
        weighting: a :class:`~jdoptim.aggregation.Weighting` (or generalized weighting). Gramian
            weightings run on the autogram engine; matrix weightings on autojac; cross-Gramian
            weightings (SDMGrad, MoDo) call the closure three times per step. Default: UPGrad.
        aggregator: alternatively, an :class:`~jdoptim.aggregation.Aggregator`. Gramian-weighted
            aggregators use the engine with their weighting; the others get the full Jacobian.
        scalarizer: alternatively, a scalarizer from :mod:`jdoptim.scalarization`.
        batch_dim: the losses' instance dimension, when loss ``i`` depends on instance ``i`` only
            (no BatchNorm in train mode): enables the engine's fast instance-wise path. ``None``
            (default) is exact for any model, at a higher cost.
        modules: modules whose parameters the engine covers; by default the engine finds the modules
            owning the optimizer's parameters while the closure runs.
        shared_params: multi-task mode. The closure returns ``(losses, features)``: per-task losses
            and the shared trunk's output; shared parameters get the combined direction, each task's
            parameters its own loss's gradient (see :func:`jdoptim.autojac.mtl_backward`).
        tasks_params: in multi-task mode, one iterable of parameters per task (default: inferred).
        fuse_backward: build ``.grad`` from what the engine's Gramian pass saved (no second
            backward). ``False`` backpropagates the weighted losses instead; both are exact.
        parallel_chunk_size: rows per batched backward on the autojac paths (``None``: all).
        grad_scaler: a ``torch.amp.GradScaler`` for mixed precision: the losses are scaled before
            differentiation and the update goes through ``grad_scaler.step`` and ``update``.
        process_group: distributed mode (:mod:`jdoptim.distributed`): each step is exact on the
            losses of every rank of this ``torch.distributed`` group (e.g. ``dist.group.WORLD``):
            concatenated along ``batch_dim``, or, without it, per-task means over the ranks. Also
            enabled by ``modules=ddp_model``. ``step`` then returns the global losses.
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
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance (such as SGD(params)), got "
                f"{type(optimizer).__name__}."
            )
        if isinstance(optimizer, JacobianDescent):
            raise TypeError("optimizer is already a JacobianDescent; wrap the inner optimizer.")
        self._method: Method = resolve_method(weighting, aggregator, scalarizer)
        self._shared_params = None if shared_params is None else list(shared_params)
        self._tasks_params = (
            None if tasks_params is None else [list(params) for params in tasks_params]
        )
        if self._shared_params is not None and self._method.path == "cross_gramian":
            raise ValueError(
                "Multi-task mode (shared_params=) does not support cross-Gramian weightings such as "
                "SDMGrad; use them on per-task losses without shared_params."
            )
        if grad_scaler is not None and self._method.path in ("jacobian", "cross_gramian"):
            raise ValueError(
                "grad_scaler is supported with Gramian weightings and scalarizers; the full-Jacobian "
                f"path used by {self._method.module!r} does not support loss scaling."
            )
        self._modules = None if modules is None else _as_module_list(modules)
        self.distributed: DistributedStep | None = distributed_step_for(
            process_group, self._modules, self._method.path, grad_scaler
        )
        self.batch_dim = batch_dim
        self.fuse_backward = fuse_backward
        self.parallel_chunk_size = parallel_chunk_size
        self.grad_scaler = grad_scaler
        self._engine: Engine | None = None
        self._engine_key: tuple[int, ...] = ()
        self._steps = 0
        # Optimizer.__init__ installs the step hooks and profiling; param_groups, state and defaults
        # are properties delegating to the wrapped optimizer once it is set below.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        if self._modules is not None:
            self._check_modules_cover_params()

    # --- sharing the wrapped optimizer's bookkeeping -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        inner = self.__dict__.get("optimizer")
        groups: list[dict[str, Any]] = (
            inner.param_groups if inner is not None else self.__dict__["_init_groups"]
        )
        return groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_init_groups"] = value
        else:
            inner.param_groups = value

    @property
    def state(self) -> Any:
        inner = self.__dict__.get("optimizer")
        return inner.state if inner is not None else self.__dict__["_init_state"]

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__["_init_state"] = value
        else:
            inner.state = value

    @property
    def method(self) -> nn.Module:
        """The weighting, aggregator or scalarizer that combines the losses."""
        return self._method.module

    def params(self) -> list[Tensor]:
        """Every parameter of every group that requires a gradient, in group order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # --- the step ------------------------------------------------------------------------------

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """Calls the closure, fills ``.grad`` by Jacobian descent, updates, and returns the losses.

        The closure is required and is called under ``torch.enable_grad()``. It should zero the
        gradients and return the loss tensor (``(losses, features)`` in multi-task mode). With a
        cross-Gramian weighting it is called three times per step, once per independent batch: it
        must draw the next batch at each call. Nothing changes if the step raises.
        """
        if closure is None or not callable(closure):
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that zeroes the gradients and returns "
                "the losses, e.g. optimizer.step(lambda: loss_fn(model(x), y)) with "
                "reduction='none'."
            )
        saved_method_state = self._method.module.state_dict()
        try:
            losses = self._fill_grad(closure)
        except BaseException:
            self._method.module.load_state_dict(saved_method_state)
            clear_jac(self.params())
            raise
        self._update()
        self._steps += 1
        self._notify_after_step(losses, closure)
        return losses

    def _fill_grad(self, closure: Closure) -> Tensor:
        if self.distributed is not None:
            return self.distributed.fill_grad(self, closure)
        path = self._method.path
        if path == "scalarizer":
            losses, _ = self._call_closure(closure)
            loss = self._method.module(losses)
            torch.autograd.backward(self._scaled(loss))
            return losses.detach()
        if path == "cross_gramian":
            return self._fill_grad_cross_gramian(closure)
        if self._shared_params is not None:
            return self._fill_grad_multi_task(closure)
        if path == "jacobian":
            losses, _ = self._call_closure(closure)
            if losses.ndim == 0:
                torch.autograd.backward(losses)
            else:
                self._fill_grad_from_jacobian(losses)
            return losses.detach()
        return self._fill_grad_from_gramian(closure)

    def _fill_grad_from_gramian(self, closure: Closure) -> Tensor:
        weighting = self._gramian_weighting
        if not _needs_gramian(weighting):
            losses, _ = self._call_closure(closure)
            if losses.ndim > 0:
                placeholder = losses.new_zeros(()).expand(*losses.shape, *losses.shape[::-1])
                torch.autograd.backward(self._scaled(losses), _weights(weighting, placeholder))
            else:
                torch.autograd.backward(self._scaled(losses))
            return losses.detach()
        engine = self._get_engine()
        with engine.capture():
            losses, _ = self._call_closure(closure)
        if losses.ndim == 0:
            torch.autograd.backward(self._scaled(losses))
            return losses.detach()
        scaled = self._scaled(losses)
        gramian = engine.compute_gramian(scaled)
        if scaled is not losses:
            gramian = gramian / self._loss_scale() ** 2
        check_finite(gramian, "The Gramian of the losses")
        weights = _weights(weighting, gramian)
        if self.fuse_backward:
            engine.backward(weights)
        else:
            torch.autograd.backward(scaled, weights)
        return losses.detach()

    def _fill_grad_from_jacobian(self, losses: Tensor) -> None:
        params = self.params()
        jac_backward(losses, inputs=params, parallel_chunk_size=self.parallel_chunk_size)
        jac_to_grad(params, self._jacobian_aggregator)

    def _fill_grad_multi_task(self, closure: Closure) -> Tensor:
        losses, features = self._call_closure(closure, expect_features=True)
        shared = [p for p in self._shared_params or [] if p.requires_grad]
        mtl_backward(
            losses,
            features,
            tasks_params=self._tasks_params,
            shared_params=shared,
            parallel_chunk_size=self.parallel_chunk_size,
        )
        aggregator = (
            self._jacobian_aggregator
            if self._method.path == "jacobian"
            else _gramian_aggregator(self._gramian_weighting)
        )
        jac_to_grad(shared, aggregator)
        return losses.detach()

    def _fill_grad_cross_gramian(self, closure: Closure) -> Tensor:
        params = self.params()
        jacobians = []
        for _ in range(2):
            losses, _ = self._call_closure(closure)
            rows = jac(losses.reshape(-1), params, parallel_chunk_size=self.parallel_chunk_size)
            jacobians.append(torch.cat([j.flatten(1) for j in rows], dim=1))
        cross_gramian = jacobians[0] @ jacobians[1].T
        weights = self._method.module(cross_gramian)
        losses, _ = self._call_closure(closure)
        if losses.shape != weights.shape:
            raise ValueError(
                f"The closure returned losses of shape {tuple(losses.shape)} for the third batch but "
                f"{tuple(weights.shape)} for the first two; every batch of a step must give the same "
                "number of losses."
            )
        torch.autograd.backward(losses, weights)
        return losses.detach()

    def _update(self) -> None:
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def _notify_after_step(self, losses: Tensor, closure: Closure) -> None:
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

    def _evaluate(self, closure: Closure) -> Tensor:
        with torch.no_grad():
            losses, _ = self._call_closure(closure)
        if self.distributed is not None:
            return self.distributed.global_losses(losses, self)
        return losses.detach()

    # --- helpers -------------------------------------------------------------------------------

    def _call_closure(self, closure: Closure, expect_features: bool = False) -> tuple[Tensor, Any]:
        with torch.enable_grad(), watch_ddp(self.distributed is not None):
            result = closure()
        features: Any = None
        if expect_features:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    "In multi-task mode (shared_params=), the closure must return a pair "
                    f"(losses, features), got {type(result).__name__}."
                )
            result, features = result
        if not isinstance(result, Tensor):
            raise TypeError(
                f"The closure must return the loss tensor, got {type(result).__name__}. Use "
                "reduction='none' in the loss function to get one loss per instance."
            )
        if not result.is_floating_point():
            raise TypeError(f"The losses must be floating-point, got dtype {result.dtype}.")
        if result.numel() == 0:
            raise ValueError(f"The closure returned no loss (shape {tuple(result.shape)}).")
        if not result.requires_grad:
            raise ValueError(
                "The losses do not require grad: the closure must compute them from the "
                "parameters, with gradients enabled."
            )
        check_finite(result.detach(), "The losses returned by the closure")
        return result, features

    @property
    def _gramian_weighting(self) -> Weighting | GeneralizedWeighting:
        module = self._method.module
        assert isinstance(module, Weighting | GeneralizedWeighting)
        return module

    @property
    def _jacobian_aggregator(self) -> Aggregator:
        module = self._method.module
        if isinstance(module, Aggregator):
            return module
        assert isinstance(module, Weighting)
        return WeightedAggregator(module)

    def _scaled(self, losses: Tensor) -> Tensor:
        if self.grad_scaler is None:
            return losses
        return self.grad_scaler.scale(losses)

    def _loss_scale(self) -> float:
        assert self.grad_scaler is not None
        return float(self.grad_scaler.get_scale())

    def _get_engine(self) -> Engine:
        params = self.params()
        key = tuple(id(p) for p in params)
        if self._engine is None or key != self._engine_key:
            if self._modules is not None:
                self._engine = Engine(*self._modules, batch_dim=self.batch_dim)
            else:
                self._engine = Engine(batch_dim=self.batch_dim, parameters=params)
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
        """Clears ``.grad`` like torch.optim and the ``.jac`` fields autojac may have left."""
        super().zero_grad(set_to_none)
        clear_jac(self.params())

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's state and the step count."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "method": self._method.module.state_dict(),
            "steps": self._steps,
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved (into a fresh optimizer and method, too)."""
        missing = {"optimizer", "method", "steps"} - set(state_dict)
        if missing:
            raise ValueError(
                f"Not a {type(self).__name__} state dict: missing {sorted(missing)}. A plain "
                "torch optimizer's state dict goes to the wrapped optimizer: "
                "jd.optimizer.load_state_dict(...)."
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._method.module.load_state_dict(state_dict["method"])
        self._steps = int(state_dict["steps"])
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def __repr__(self) -> str:
        options = f"{self._method.path}: {self._method.module!r}, batch_dim={self.batch_dim}"
        return f"{type(self).__name__}({self.optimizer!r}, {options})"


def _as_module_list(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    result = [modules] if isinstance(modules, nn.Module) else list(modules)
    if not result or not all(isinstance(m, nn.Module) for m in result):
        raise TypeError("modules must be a Module or a non-empty iterable of Modules.")
    return result


def _needs_gramian(weighting: Weighting | GeneralizedWeighting) -> bool:
    if isinstance(weighting, Flattening):
        return weighting.weighting.requires_values
    if isinstance(weighting, Weighting):
        return weighting.requires_values
    return True


def _weights(weighting: Weighting | GeneralizedWeighting, gramian: Tensor) -> Tensor:
    """Weights for a (generalized) Gramian; a plain weighting is flattened for ndim > 2."""
    if isinstance(weighting, Weighting) and gramian.ndim != 2:
        if gramian.ndim == 0:
            raise ValueError("A scalar loss needs no weighting.")
        return Flattening(weighting)(gramian)
    return weighting(gramian)


def _gramian_aggregator(weighting: Weighting | GeneralizedWeighting) -> Aggregator:
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"Multi-task mode needs a Weighting of [T, T] Gramians, got {weighting!r}; generalized "
            "weightings apply to instance-wise multi-task losses without shared_params."
        )
    return GramianWeightedAggregator(weighting)


def _method_parts(module: nn.Module) -> list[nn.Module]:
    parts = [module]
    inner = getattr(module, "weighting", None)
    if isinstance(module, WeightedAggregator) and isinstance(inner, nn.Module):
        parts.append(inner)
    return parts
