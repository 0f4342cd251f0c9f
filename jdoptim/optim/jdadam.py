"""``JDAdam``: ``torch.optim.Adam`` driven by Jacobian descent."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Adam
from torch.optim.optimizer import ParamsT

from jdoptim.optim._options import JDOptions, Unpack
from jdoptim.optim.jacobian_descent import JacobianDescent


class JDAdam(JacobianDescent):
    """``JacobianDescent(Adam(params, ...), **options)``: Adam's arguments, then Jacobian descent's."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        **options: Unpack[JDOptions],
    ) -> None:
        # Passed only when set: torch's Adam has it from 2.6 on (AdamW's weight decay).
        decoupled = {"decoupled_weight_decay": True} if decoupled_weight_decay else {}
        inner = Adam(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            **decoupled,
        )
        super().__init__(inner, **options)
