"""PyTorch Lightning: ``JacobianDescentModule`` trains on a vector of losses with any jdoptim optimizer.

Subclass it instead of ``LightningModule``, return the losses (``[B]``, ``[T]`` or ``[B, T]``) from
``training_step`` and a jdoptim optimizer from ``configure_optimizers``; the rest is Lightning's
own loop. Its ``backward`` hook, which Lightning calls where a scalar loss would be backpropagated,
hands the losses to ``optimizer.backward``, so everything Lightning does around backward and step
keeps its place: the precision plugin scales the losses (``16-mixed``) and unscales ``.grad``,
``gradient_clip_val`` clips the Jacobian-descent direction, ``accumulate_grad_batches`` accumulates
micro-batches exactly, and schedulers, ``LearningRateMonitor``, logging and checkpoints see a torch
optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jdoptim.integrations.lightning needs PyTorch Lightning: pip install jdoptim[lightning]"
    ) from error

from jdoptim.autojac import reached_by
from jdoptim.distributed import any_sharded
from jdoptim.optim import JacobianDescent

__all__ = ["JacobianDescentModule"]


class JacobianDescentModule(pl.LightningModule):
    """A ``LightningModule`` whose ``backward`` runs Jacobian descent on the losses it is given.

    Automatic optimization: ``training_step`` returns the losses (or ``{"loss": losses, ...}``).
    Lightning divides them by ``accumulate_grad_batches``, right for a mean loss; per-instance
    losses (the optimizer's ``batch_dim`` set) are multiplied back, because the optimizer's
    accumulation concatenates micro-batches, so the accumulated step equals the step on the whole
    batch. Per-task losses keep the division: their sum over micro-batches is the whole batch's mean.

    Manual optimization: ``self.manual_backward(losses)`` (``features=`` in multi-task mode,
    ``jd_optimizer=`` to choose among several jdoptim optimizers) then ``opt.step(...)``. Beside
    other optimizers (a GAN), a loss is the jdoptim optimizer's unless it is a scalar, or
    ``toggle_optimizer`` switched that optimizer's parameters off, or ``jd_optimizer=`` names
    another optimizer; those, and every loss without a jdoptim optimizer, take Lightning's
    ``backward``.
    """

    def manual_backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``manual_backward``, also for per-task losses given as a list or tuple of
        scalars (stacked first: Lightning's precision plugins take one tensor)."""
        if isinstance(loss, list | tuple):
            loss = torch.stack([torch.as_tensor(item) for item in loss])
        super().manual_backward(loss, *args, **kwargs)

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        features = kwargs.pop("features", None)
        optimizer = self._jacobian_descent_optimizer(kwargs.pop("jd_optimizer", None), loss)
        if optimizer is None:
            super().backward(loss, *args, **kwargs)
            return
        if args or kwargs:
            raise TypeError(
                f"backward() with a jdoptim optimizer takes only features= and jd_optimizer=, got "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments."
            )
        accumulation = self.trainer.accumulate_grad_batches
        if self.automatic_optimization and optimizer.batch_dim is not None and accumulation != 1:
            loss = _times(loss, accumulation)
        # A manual training_step runs under the precision plugin's autocast; the Gramian, Jacobian
        # and weights must not be computed in half precision (a scaled float16 Gramian overflows).
        with torch.autocast(_device_type(loss), enabled=False):
            optimizer.backward(loss, features=features)

    def _jacobian_descent_optimizer(self, chosen: Any, loss: Any) -> JacobianDescent | None:
        """The jdoptim optimizer ``loss`` is for, or ``None`` for Lightning's own backward."""
        if chosen is not None:
            found = _unwrapped(chosen)
            if found is None:
                raise TypeError(
                    f"jd_optimizer= must be one of the optimizers of configure_optimizers, got "
                    f"{type(chosen).__name__}."
                )
            # Another optimizer named: the loss is its, and its backward is Lightning's.
            return found if isinstance(found, JacobianDescent) else None
        configured = self.optimizers(use_pl_optimizer=False)
        optimizers = configured if isinstance(configured, list) else [configured]
        ours = [o for o in optimizers if isinstance(o, JacobianDescent)]
        if len(ours) > 1:
            raise TypeError(
                f"configure_optimizers returned {len(ours)} jdoptim optimizers: say which one the "
                "losses are for with self.manual_backward(losses, jd_optimizer=opt)."
            )
        if not ours:
            return None
        if len(ours) < len(optimizers) and not _for_jacobian_descent(ours[0], loss):
            # Beside a plain optimizer (a GAN's other network): a scalar loss, or one while
            # toggle_optimizer has switched this optimizer's parameters off, is the other's.
            return None
        return ours[0]


def _for_jacobian_descent(optimizer: JacobianDescent, loss: Any) -> bool:
    """Whether ``loss``, beside plain optimizers, is the jdoptim optimizer's: not a scalar, and
    reaching some of its parameters (trainable: ``toggle_optimizer`` switches them off)."""
    if isinstance(loss, Tensor) and loss.ndim == 0:
        return False
    params = [param for param in optimizer.params() if param.requires_grad]
    if any_sharded(params):  # the graph reaches the unsharded copies, not these
        return True
    tensors = [t for t in (loss if isinstance(loss, list | tuple) else [loss]) if _in_graph(t)]
    return bool(params) and bool(tensors) and any(reached_by(tensors, params))


def _in_graph(item: Any) -> bool:
    return isinstance(item, Tensor) and item.requires_grad


def _times(loss: Any, factor: int) -> Any:
    if isinstance(loss, list | tuple):
        return [item * factor for item in loss]
    return loss * factor


def _device_type(loss: Any) -> str:
    """The device type of the losses: a tensor, or a list or tuple of per-task tensors."""
    items = loss if isinstance(loss, list | tuple) else [loss]
    for item in items:
        if isinstance(item, Tensor):
            return item.device.type
    return "cpu"


def _unwrapped(optimizer: Any) -> Optimizer | None:
    inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer
    return inner if isinstance(inner, Optimizer) else None
