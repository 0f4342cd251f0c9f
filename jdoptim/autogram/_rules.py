"""Closed-form per-instance gradients of common layers, from saved inputs and output gradients.

With instances independent, one backward pass gives, at each layer output ``Y``, the gradient
``dY`` of every task's summed losses; its slice ``i`` along the batch dim is instance ``i``'s. A
layer whose parameters act linearly on a known feature map then has per-instance gradients in
closed form, e.g. ``gᵢ = Σₛ dYᵢₛᵀ Xᵢₛ`` for ``Linear`` (Algorithm 3 of Quinton & Rey, *Jacobian
Descent for Multi-Objective Optimization*, 2024, generalised to any layer of this form). Each
rule returns one :class:`~jdoptim.autogram.Term` per parameter.

:data:`CLOSED_FORMS` maps each supported module type to its rule; :func:`closed_form_rule` picks
the rule of a module (only for the type's stock ``forward``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram._terms import BiasTerm, EmbeddingTerm, MaterializedTerm, OuterTerm, Term

#: One call of a layer: its saved input ``x``, the task gradients ``dY`` ``[T, *y.shape]`` and
#: the verified batch dim of ``y`` (``None`` for batch size 1).
Call = tuple[Tensor, Tensor, int | None]


class ClosedFormRule(ABC):
    """The closed form of one layer type: where its instances lie, and its parameters' terms."""

    def accepts(self, module: nn.Module) -> bool:
        """Whether this instance's configuration is covered (e.g. zero padding for convolutions)."""
        return True

    @abstractmethod
    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        """Dims of the call's output that may hold the instances, from the layer's semantics."""

    @abstractmethod
    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        """Terms of ``module``'s direct parameters, keyed by parameter name."""


def to_instances(tensor: Tensor, batch_dim: int | None, offset: int = 0) -> Tensor:
    """Moves the batch dim (after ``offset`` leading dims) to position ``offset``.

    ``batch_dim=None`` means the whole tensor belongs to one instance (batch size 1).
    """
    if batch_dim is None:
        return tensor.unsqueeze(offset)
    return tensor.movedim(offset + batch_dim, offset)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _instance_rows(
    x: Tensor, dy: Tensor, batch_dim: int | None, k: int, d: int
) -> tuple[Tensor, Tensor]:
    """``a [T, B, S, k]`` from ``dY`` and ``b [B, S, d]`` from ``x``, positions flattened."""
    a = to_instances(dy, batch_dim, offset=1)
    b = to_instances(x, batch_dim)
    return a.reshape(a.shape[0], a.shape[1], -1, k), b.reshape(b.shape[0], -1, d)


class LinearRule(ClosedFormRule):
    """``nn.Linear`` on any leading dims: ``gᵢ = Σₛ dYᵢₛ ⊗ Xᵢₛ``."""

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        return list(range(len(y_shape) - 1))

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.Linear)
        k, d = module.out_features, module.in_features
        parts = [_instance_rows(x.to(dtype), dy.to(dtype), bd, k, d) for x, dy, bd in calls]
        a = _cat([p[0] for p in parts], dim=2)
        b = _cat([p[1] for p in parts], dim=1)
        terms: dict[str, Term] = {"weight": OuterTerm(a, b, (k, d))}
        if module.bias is not None:
            terms["bias"] = BiasTerm(a, (k,))
        return terms


class ConvRule(ClosedFormRule):
    """``Conv1d/2d/3d`` with zero padding and ``groups=1``: a linear layer on unfolded patches."""

    def accepts(self, module: nn.Module) -> bool:
        assert isinstance(module, nn.modules.conv._ConvNd)
        plain_3d = not isinstance(module, nn.Conv3d) or tuple(module.dilation) == (1, 1, 1)
        return (
            module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
            and module.groups == 1
            and plain_3d
        )

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        return [0] if len(y_shape) == len(module.kernel_size) + 2 else []

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        k = module.out_channels
        a_parts, b_parts = [], []
        spatial = len(module.kernel_size)
        for x, dy, bd in calls:
            x, dy = x.to(dtype), dy.to(dtype)
            if bd is None and x.ndim == spatial + 1:  # one unbatched instance
                x, dy, bd = x.unsqueeze(0), dy.unsqueeze(1), 0
            patches = _patches(module, x)  # [N, L, d]
            grads = dy.reshape(*dy.shape[:3], -1).transpose(2, 3)  # [T, N, L, k]
            if bd is None:  # batch size 1: all N samples of the layer belong to the one instance
                patches = patches.reshape(1, -1, patches.shape[-1])
                grads = grads.reshape(grads.shape[0], 1, -1, k)
            a_parts.append(grads)
            b_parts.append(patches)
        a, b = _cat(a_parts, dim=2), _cat(b_parts, dim=1)
        terms: dict[str, Term] = {"weight": OuterTerm(a, b, tuple(module.weight.shape))}
        if module.bias is not None:
            terms["bias"] = BiasTerm(a, (k,))
        return terms


def _patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``[N, L, C·∏kernel]``: the input patches each output position sees (``F.unfold`` order)."""
    kernel = tuple(module.kernel_size)
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    padding = tuple(int(p) for p in module.padding)  # a str padding never gets here
    if len(kernel) == 1:
        cols = F.unfold(
            x.unsqueeze(2),
            (1, kernel[0]),
            dilation=(1, dilation[0]),
            padding=(0, padding[0]),
            stride=(1, stride[0]),
        )
    elif len(kernel) == 2:
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    else:
        padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
        windows = padded.unfold(2, kernel[0], stride[0])
        windows = windows.unfold(3, kernel[1], stride[1]).unfold(4, kernel[2], stride[2])
        n, c = x.shape[:2]
        windows = windows.permute(0, 1, 5, 6, 7, 2, 3, 4)  # [N, C, kd, kh, kw, D', H', W']
        cols = windows.reshape(n, c * math.prod(kernel), -1)
    return cols.transpose(1, 2)


class EmbeddingRule(ClosedFormRule):
    """``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``): rows of the table."""

    def accepts(self, module: nn.Module) -> bool:
        assert isinstance(module, nn.Embedding)
        return module.max_norm is None and not module.scale_grad_by_freq

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        return list(range(len(y_shape) - 1))

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.Embedding)
        k = module.embedding_dim
        a_parts, idx_parts = [], []
        for x, dy, bd in calls:
            idx = to_instances(x, bd)
            idx = idx.reshape(idx.shape[0], -1)
            a = to_instances(dy.to(dtype), bd, offset=1)
            a = a.reshape(a.shape[0], a.shape[1], -1, k)
            if module.padding_idx is not None:
                a = a * (idx != module.padding_idx).unsqueeze(-1).to(dtype)
            a_parts.append(a)
            idx_parts.append(idx)
        shape = (module.num_embeddings, k)
        term = EmbeddingTerm(_cat(a_parts, 2), _cat(idx_parts, 1), shape, sparse=module.sparse)
        return {"weight": term}


def _affine_terms(
    products: list[Tensor], grads: list[Tensor], shape: tuple[int, ...], has_bias: bool
) -> dict[str, Term]:
    """Elementwise affine ``y = x̂ ∘ γ + β``: rows ``Σₛ dY ∘ x̂`` and ``Σₛ dY``, ``[T, B, n]`` each."""
    weight_rows = sum(products[1:], products[0])
    terms: dict[str, Term] = {
        "weight": MaterializedTerm(
            weight_rows.transpose(0, 1).reshape(-1, weight_rows.shape[-1]), shape
        )
    }
    if has_bias:
        bias_rows = sum(grads[1:], grads[0])
        terms["bias"] = MaterializedTerm(
            bias_rows.transpose(0, 1).reshape(-1, bias_rows.shape[-1]), shape
        )
    return terms


class LayerNormRule(ClosedFormRule):
    """``nn.LayerNorm``: an elementwise affine map of the normalised input."""

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        assert isinstance(module, nn.LayerNorm)
        return list(range(len(y_shape) - len(module.normalized_shape)))

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.LayerNorm)
        shape = tuple(module.normalized_shape)
        n = math.prod(shape)
        products, grads = [], []
        for x, dy, bd in calls:
            normalized = F.layer_norm(x.to(dtype), shape, None, None, module.eps)
            xhat = to_instances(normalized, bd)
            xhat = xhat.reshape(xhat.shape[0], -1, n)
            a = to_instances(dy.to(dtype), bd, offset=1)
            a = a.reshape(a.shape[0], a.shape[1], -1, n)
            products.append((a * xhat).sum(dim=2))
            grads.append(a.sum(dim=2))
        if module.weight is None:
            if module.bias is None:
                return {}
            return {"bias": _affine_terms(grads, grads, shape, False)["weight"]}
        return _affine_terms(products, grads, shape, module.bias is not None)


class GroupNormRule(ClosedFormRule):
    """``nn.GroupNorm``: an elementwise affine map per channel of the normalised input."""

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        return [0] if len(y_shape) >= 2 else []

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.GroupNorm)
        if not module.affine:
            return {}

        def normalized(x: Tensor) -> Tensor:
            return F.group_norm(x, module.num_groups, None, None, module.eps)

        return _per_channel_affine_terms(calls, dtype, module.num_channels, normalized)


class InstanceNormRule(ClosedFormRule):
    """``nn.InstanceNorm1d/2d/3d`` on a batch: an affine map per channel of the input normalised
    per instance and channel (by the running statistics in ``eval()`` mode when it tracks them)."""

    def batch_dims(self, module: nn.Module, y_shape: tuple[int, ...]) -> list[int]:
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        unbatched: int = module._get_no_batch_dim()  # type: ignore[no-untyped-call]
        return [0] if len(y_shape) == unbatched + 1 else []

    def terms(self, module: nn.Module, calls: list[Call], dtype: torch.dtype) -> dict[str, Term]:
        assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
        if not module.affine:
            return {}
        norm = module
        return _per_channel_affine_terms(
            calls, dtype, module.num_features, lambda x: _instance_normalized(norm, x)
        )


def _per_channel_affine_terms(
    calls: list[Call], dtype: torch.dtype, channels: int, normalized: Callable[[Tensor], Tensor]
) -> dict[str, Term]:
    """Terms of a per-channel affine map ``y = x̂ γ + β`` of ``[N, C, ...]`` inputs, ``x̂`` the
    normalised input (group norm, instance norm)."""
    products, grads = [], []
    for x, dy, bd in calls:
        xhat = normalized(x.to(dtype)).reshape(x.shape[0], channels, -1)  # [N, C, positions]
        a = dy.to(dtype).reshape(dy.shape[0], dy.shape[1], channels, -1)
        if bd is None:  # batch size 1: all N samples of the layer belong to the one instance
            xhat = xhat.transpose(0, 1).reshape(1, channels, -1)
            a = a.transpose(1, 2).reshape(a.shape[0], 1, channels, -1)
        products.append((a * xhat).sum(dim=-1))
        grads.append(a.sum(dim=-1))
    return _affine_terms(products, grads, (channels,), True)


def _instance_normalized(norm: nn.modules.instancenorm._InstanceNorm, x: Tensor) -> Tensor:
    """The input normalised as the layer's forward did (without updating running statistics)."""
    if norm.training or not norm.track_running_stats:
        return F.instance_norm(x, eps=norm.eps)
    assert norm.running_mean is not None and norm.running_var is not None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = norm.running_mean.to(x.dtype).reshape(shape)
    return (x - mean) * torch.rsqrt(norm.running_var.to(x.dtype).reshape(shape) + norm.eps)


_CONV = ConvRule()

#: The closed form of each supported module type (applies to subclasses that keep its forward).
CLOSED_FORMS: dict[type[nn.Module], ClosedFormRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.modules.instancenorm._InstanceNorm: InstanceNormRule(),
}


# The methods a closed form's stock computation runs: a subclass overriding one of them (weight
# standardisation in _conv_forward, say) computes something else.
_FORWARD_METHODS = ("forward", "_conv_forward")


def closed_form_rule(module: nn.Module) -> ClosedFormRule | None:
    """The closed form for ``module``, or ``None`` if it needs a generic exact route.

    Only the stock ``forward`` of each type qualifies (and the stock ``_conv_forward`` it calls): a
    subclass overriding it may use its parameters differently. So does only a module whose ``weight`` and ``bias`` are its own
    parameters, and its only ones: a parametrized weight (``weight_norm``, ``spectral_norm``,
    ``torch.nn.utils.parametrize``) is computed from other parameters, which the closed form
    would miss.
    """
    for cls in type(module).__mro__:
        rule = CLOSED_FORMS.get(cls)
        if rule is not None:
            stock = all(
                getattr(type(module), name, None) is getattr(cls, name, None)
                for name in _FORWARD_METHODS
            )
            return rule if stock and _plain_parameters(module) and rule.accepts(module) else None
    return None


def _plain_parameters(module: nn.Module) -> bool:
    """Whether the tensors the stock forward reads, ``weight`` and ``bias``, are the module's own
    parameters, none empty, and the module has no other."""
    own = dict(module.named_parameters(recurse=False))
    if not set(own) <= {"weight", "bias"}:
        return False
    if any(param.numel() == 0 for param in own.values()):  # nn.Linear(0, d): nothing to factor
        return False
    return all(getattr(module, name, None) is own.get(name) for name in ("weight", "bias"))
