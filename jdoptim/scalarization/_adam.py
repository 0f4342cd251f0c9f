"""One step of Adam on a plain tensor, for methods that learn a few numbers of their own (FAMO).

Written functionally so the moments live in the method's ``_state`` (saved, moved and reset with
it) instead of inside a ``torch.optim.Adam`` whose state would have to be wired in separately.
"""

from __future__ import annotations

import math

from torch import Tensor

BETAS = (0.9, 0.999)
EPS = 1e-8


def adam_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(param, exp_avg, exp_avg_sq)`` after Adam step number ``step`` (counted from 1).

    Kingma & Ba, *Adam: A Method for Stochastic Optimization* (ICLR 2015), Algorithm 1, with the
    weight decay added to the gradient (L2 regularisation, as in ``torch.optim.Adam``) and the
    same order of operations as ``torch.optim.Adam``, so both give the same numbers.
    """
    beta1, beta2 = BETAS
    grad = grad + weight_decay * param if weight_decay != 0 else grad
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add(EPS)
    return param.addcdiv(exp_avg, denominator, value=-step_size), exp_avg, exp_avg_sq
