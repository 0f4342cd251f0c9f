"""FAMO: fast adaptive multitask optimisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim._named import tensor_repr
from jdoptim._stateful import Stateful
from jdoptim._step_info import StepInfo
from jdoptim.linalg import check_finite, check_tensor
from jdoptim.scalarization._adam import adam_step
from jdoptim.scalarization._bases import (
    Scalarizer,
    as_shape,
    check_loss_like,
    check_number,
    check_value_shape,
    numbers_table,
)

# Keeps the logarithms finite when a loss reaches its lower bound (as in the authors' code).
_LOG_EPS = 1e-8


class FAMO(Stateful, Scalarizer):
    """``c Σᵢ zᵢ log(Lᵢ - bᵢ + ε)`` with ``z = softmax(ξ)`` and ``c = (Σᵢ zᵢ / (Lᵢ - bᵢ + ε))⁻¹``.

    Liu et al., *FAMO: Fast Adaptive Multitask Optimization* (NeurIPS 2023), Algorithm 1. ``c`` is
    treated as a constant, so the model's gradient ``c Σᵢ zᵢ ∇Lᵢ / (Lᵢ - bᵢ + ε)`` is a convex
    combination of the task gradients that aims to decrease every log-loss at the same rate, from
    loss values only (no per-task gradients).

    The logits ``ξ`` are learnt between steps: with the losses recomputed on the same batch after
    the model's update, ``δᵢ = log(Lᵢ_before - bᵢ + ε) - log(Lᵢ_after - bᵢ + ε)`` (how much each
    task improved) and ``ξ`` takes one Adam step (learning rate ``lr``, L2 ``weight_decay``) along
    ``∂z/∂ξᵀ δ``, which shifts weight towards the tasks that improved least. Call :meth:`update`
    with the new losses after ``optimizer.step()``; the jdoptim optimizers do it through
    :meth:`after_step`, which recomputes the losses with ``info.evaluate()``.

    State (``state_dict``, ``.to()``, ``reset``): the logits, Adam's moments and step count, and
    the losses of the last call in training mode.

    Args:
        shape: shape of the losses (an int ``n`` means ``(n,)``).
        min_losses: lower bounds ``b`` of the losses (shape ``shape``); ``None``: zeros.
        lr: Adam's learning rate for the logits (the paper uses 0.025).
        weight_decay: L2 regularisation of the logits (the paper's ``γ``).
    """

    hyper_parameters = numbers_table(lr=False, weight_decay=False)

    min_losses: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 0.001,
    ) -> None:
        super().__init__()
        self.shape = as_shape(shape)
        if min_losses is None:
            bounds = torch.zeros(self.shape)
        else:
            bounds = check_loss_like(min_losses, "min_losses")
            if tuple(bounds.shape) != self.shape:
                raise ValueError(
                    f"min_losses has shape {tuple(bounds.shape)} but FAMO was built for losses "
                    f"of shape {list(self.shape)}."
                )
        self.register_buffer("min_losses", bounds, persistent=False)
        self.lr = check_number(lr, "lr", positive=False)
        self.weight_decay = check_number(weight_decay, "weight_decay", positive=False)
        self.reset()

    def reset(self) -> None:
        """Uniform task weights again (``ξ = 0``), fresh Adam moments, no remembered losses."""
        super().reset()
        logits = torch.zeros(self.shape, device=self.min_losses.device)
        self._state.update(
            logits=logits,
            exp_avg=torch.zeros_like(logits),
            exp_avg_sq=torch.zeros_like(logits),
            adam_steps=0,
            losses_before=None,
        )

    @property
    def task_weights(self) -> Tensor:
        """The current task weights ``z = softmax(ξ)`` (shape ``shape``, summing to 1)."""
        logits: Tensor = self._state["logits"]
        return torch.softmax(logits.flatten(), dim=0).reshape(logits.shape)

    def forward(self, values: Tensor, /) -> Tensor:
        shifted = self._shifted_losses(values)
        weights = self.task_weights.to(dtype=values.dtype, device=values.device)
        scale = 1.0 / (weights / shifted.detach()).sum()
        if self.training:
            self._state["losses_before"] = values.detach().clone()
        return scale * (weights * shifted.log()).sum()

    def update(self, losses_after: Tensor, /) -> None:
        """Learns the logits from the losses of the same batch after the model's update."""
        check_tensor(losses_after, "losses_after")
        check_finite(losses_after, "losses_after")
        before = self._state["losses_before"]
        if before is None:
            raise RuntimeError(
                "FAMO.update() needs the losses before the step: call the scalarizer on the "
                "training losses (in training mode) before optimizer.step(), then update() once."
            )
        losses_after = losses_after.detach()
        improvement = self._shifted_losses(before).log() - self._shifted_losses(losses_after).log()
        logits: Tensor = self._state["logits"]
        weights = self.task_weights
        improvement = improvement.to(dtype=logits.dtype, device=logits.device)
        # Gradient of zᵀδ w.r.t. ξ through the softmax: z ⊙ (δ - zᵀδ).
        grad = weights * (improvement - (weights * improvement).sum())
        steps = self._state["adam_steps"] + 1
        logits, exp_avg, exp_avg_sq = adam_step(
            logits,
            grad,
            self._state["exp_avg"],
            self._state["exp_avg_sq"],
            steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
        )
        self._state.update(
            logits=logits,
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
            adam_steps=steps,
            losses_before=None,
        )

    def after_step(self, info: StepInfo) -> None:
        """Recomputes the losses at the updated parameters and calls :meth:`update` with them."""
        self.update(info.evaluate())

    def _shifted_losses(self, values: Tensor) -> Tensor:
        check_value_shape(values, self.shape, "FAMO's task logits")
        shifted = values - self.min_losses.to(dtype=values.dtype, device=values.device)
        if bool((shifted < 0).any()):
            raise ValueError(
                "FAMO takes log(loss - min_loss): every loss must be at least its min_losses entry "
                f"(zero by default), but the smallest gap is {float(shifted.detach().min()):.3g}."
            )
        return shifted + _LOG_EPS

    def _repr_args(self) -> str:
        bounds = None if not bool(self.min_losses.any()) else self.min_losses
        return (
            f"shape={list(self.shape)}, min_losses={tensor_repr(bounds)}, lr={self.lr:g}, "
            f"weight_decay={self.weight_decay:g}"
        )
