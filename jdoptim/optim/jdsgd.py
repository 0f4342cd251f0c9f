"""``JDSGD``: ``torch.optim.SGD`` driven by Jacobian descent."""

from __future__ import annotations

from torch import Tensor
from torch.optim import SGD
from torch.optim.optimizer import ParamsT

from jdoptim.optim._options import JDOptions, Unpack
from jdoptim.optim.jacobian_descent import JacobianDescent


class JDSGD(JacobianDescent):
    """``JacobianDescent(SGD(params, ...), **options)``: SGD's arguments, then Jacobian descent's.

    Example: ``JDSGD(model.parameters(), lr=0.1, weighting=UPGradWeighting(), batch_dim=0)``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        **options: Unpack[JDOptions],
    ) -> None:
        inner = SGD(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(inner, **options)
