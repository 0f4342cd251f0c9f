"""DWA: dynamic weight average."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim._stateful import Stateful
from jdoptim._step_info import StepInfo
from jdoptim.scalarization._bases import Scalarizer, check_number, check_value_shape, numbers_table


class DWA(Stateful, Scalarizer):
    """``Σₖ λₖ Lₖ`` with ``λ = K softmax(r / T)``, ``rₖ = L̄ₖ(t-1) / L̄ₖ(t-2)``.

    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention* (CVPR 2019).
    ``L̄ₖ(t)`` is loss ``k`` averaged over epoch ``t`` and ``K`` the number of losses, so the weights
    sum to ``K``; a loss that decreased more slowly than the others gets more weight, and a larger
    temperature ``T`` makes the weights more uniform. During the first two epochs the weights are 1.

    How epochs are counted: every call in training mode (``scalarizer.train()``, the default)
    adds the detached losses to the current epoch's average; calls in eval mode are not recorded.
    The epoch ends when :meth:`step` is called (once per epoch, with a plain torch optimizer) or,
    when ``steps_per_epoch`` is given, automatically after that many optimizer steps reported
    through :meth:`after_step` (the jdoptim optimizers call it after each step).

    State (``state_dict``, ``reset``): the last two epoch averages and the current epoch's sums.

    Args:
        temperature: ``T > 0`` (the paper uses 2).
        steps_per_epoch: number of :meth:`after_step` calls per epoch; ``None``: call :meth:`step`.
    """

    hyper_parameters = numbers_table(temperature=True)

    def __init__(self, temperature: float = 2.0, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        self.temperature = check_number(temperature, "temperature", positive=True)
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, int)
            or steps_per_epoch < 1
        ):
            raise ValueError(
                f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}."
            )
        self.steps_per_epoch = steps_per_epoch

    def forward(self, values: Tensor, /) -> Tensor:
        weights = self.weights(values)
        if self.training:
            self._record(values.detach())
        return (weights * values).sum()

    def weights(self, values: Tensor) -> Tensor:
        """The weights ``λ`` (shape of ``values``) for the current epoch."""
        last, previous = self._state.get("last_average"), self._state.get("previous_average")
        if last is None or previous is None:
            return torch.ones_like(values)
        check_value_shape(values, tuple(last.shape), "the losses DWA recorded so far")
        rates = (last.to(values.device) / previous.to(values.device)).to(values.dtype)
        return values.numel() * torch.softmax(rates.flatten() / self.temperature, dim=0).reshape(
            values.shape
        )

    def step(self) -> None:
        """Ends the current epoch: its average becomes ``L̄(t-1)``. Call once per epoch."""
        total, calls = self._state.get("epoch_sum"), self._state.get("epoch_calls", 0)
        if total is None or calls == 0:
            raise RuntimeError(
                "DWA.step() ends an epoch, but no losses were recorded in this one: call the "
                "scalarizer on the training losses (in training mode) before ending the epoch."
            )
        self._state["previous_average"] = self._state.get("last_average")
        self._state["last_average"] = total / calls
        self._state["epoch_sum"] = None
        self._state["epoch_calls"] = 0

    def after_step(self, info: StepInfo) -> None:
        """Counts optimizer steps and ends the epoch every ``steps_per_epoch`` of them."""
        if self.steps_per_epoch is None:
            return
        steps = self._state.get("steps_in_epoch", 0) + 1
        if steps == self.steps_per_epoch:
            self.step()
            steps = 0
        self._state["steps_in_epoch"] = steps

    def _record(self, values: Tensor) -> None:
        total = self._state.get("epoch_sum")
        if total is not None:
            check_value_shape(values, tuple(total.shape), "the losses DWA recorded this epoch")
            values = total.to(values.device) + values.to(total.dtype)
        elif (last := self._state.get("last_average")) is not None:
            check_value_shape(values, tuple(last.shape), "the losses DWA recorded so far")
        self._state["epoch_sum"] = values.clone()
        self._state["epoch_calls"] = self._state.get("epoch_calls", 0) + 1

    def _repr_args(self) -> str:
        return f"temperature={self.temperature:g}, steps_per_epoch={self.steps_per_epoch}"
