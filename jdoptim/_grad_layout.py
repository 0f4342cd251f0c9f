"""``.grad`` laid out as autograd lays it out: with its parameter's strides.

Autograd gives a parameter's ``.grad`` the parameter's strides (contiguous for a parameter that is
not dense). Fused and ``foreach`` optimizers rely on it: they read ``.grad`` and the parameter as
flat memory, so a contiguous ``.grad`` of a ``channels_last`` convolution weight (or a transposed
parameter) updates the wrong entries. jdoptim builds its ``.grad`` from products that come out
contiguous, hence this one step before writing it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def in_param_layout(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` itself when its layout is ``param``'s (the common, contiguous case), else a copy
    with the strides autograd would give ``param.grad``."""
    if grad.is_sparse or grad.shape != param.shape:
        return grad
    if param.is_contiguous() and grad.is_contiguous():
        return grad
    laid_out = torch.empty_like(param, dtype=grad.dtype, device=grad.device)
    if laid_out.stride() == grad.stride():
        return grad
    return laid_out.copy_(grad)


def stored_values(grad: Tensor) -> Tensor:
    """The values a gradient stores: a sparse one's (``nn.Embedding(sparse=True)``), else itself;
    for checks such as "is it all zero" or "is it finite" that must not densify a sparse table."""
    return grad._values() if grad.is_sparse else grad


def lay_out_grads(params: list[Tensor]) -> None:
    """Gives every ``.grad`` of ``params`` its parameter's layout (:func:`in_param_layout`)."""
    for param in params:
        if param.grad is not None:
            param.grad = in_param_layout(param.grad, param)
