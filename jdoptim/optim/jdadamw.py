"""``JDAdamW``: ``torch.optim.AdamW`` driven by Jacobian descent."""

from __future__ import annotations

from torch import Tensor
from torch.optim import AdamW
from torch.optim.optimizer import ParamsT

from jdoptim.optim._options import JDOptions, Unpack
from jdoptim.optim.jacobian_descent import JacobianDescent


class JDAdamW(JacobianDescent):
    """``JacobianDescent(AdamW(params, ...), **options)``: AdamW's arguments, then Jacobian descent's."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        **options: Unpack[JDOptions],
    ) -> None:
        inner = AdamW(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(inner, **options)
