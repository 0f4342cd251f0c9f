"""Closed-form per-instance gradients of common layers, from saved inputs and output gradients.

With instances independent, one backward pass gives, at each layer output ``Y``, the gradient
``dY`` of every task's summed losses; its slice ``i`` along the batch dim is instance ``i``'s. A
layer whose parameters act linearly on a known feature map then has per-instance gradients in
closed form, e.g. ``gᵢ = Σₛ dYᵢₛᵀ Xᵢₛ`` for ``Linear`` (Algorithm 3 of Quinton & Rey, *Jacobian
Descent for Multi-Objective Optimization*, 2024, generalised to any layer of this form). Each
rule returns one :class:`Term` per parameter: its contribution ``Jₚ Jₚᵀ`` to the Gramian and its
weighted gradient ``wᵀ Jₚ`` for the fused ``.grad`` path.

Rows are indexed ``(i, t)``, instance-major: ``a`` tensors are ``[T, B, S, k]`` (tasks, instances,
positions inside an instance, features) and weights ``w`` are ``[B, T]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Largest [rows * positions]² kernel the pairwise form may build (elements).
_MAX_PAIRWISE_ELEMENTS = 2**26


class Term(ABC):
    """The part of the Jacobian that belongs to one parameter, in whatever form is cheapest.

    ``route`` says how it was obtained: ``"closed_form"`` (a layer rule), ``"local"`` (exact
    per-instance VJPs of one module call) or ``"exact"`` (per-row autograd on the whole graph).
    """

    route: str = "closed_form"

    @abstractmethod
    def gramian(self) -> Tensor:
        """``Jₚ Jₚᵀ``, ``[M, M]`` with ``M = B * T``."""

    @abstractmethod
    def weighted_grad(self, weights: Tensor) -> Tensor:
        """``Σᵢₜ wᵢₜ gᵢₜ`` in the parameter's shape, for weights ``[B, T]``."""


@dataclass
class MaterializedTerm(Term):
    """Per-row gradients stored as ``[M, n]`` (rows instance-major)."""

    rows: Tensor
    shape: tuple[int, ...]
    route: str = "closed_form"

    def gramian(self) -> Tensor:
        return self.rows @ self.rows.T

    def weighted_grad(self, weights: Tensor) -> Tensor:
        return (weights.reshape(-1).to(self.rows.dtype) @ self.rows).reshape(self.shape)


@dataclass
class OuterTerm(Term):
    """Per-row gradients ``g[i, t] = Σₛ a[t, i, s] ⊗ b[i, s]`` kept in factored form."""

    a: Tensor  # [T, B, S, k]
    b: Tensor  # [B, S, d]
    shape: tuple[int, ...]

    def gramian(self) -> Tensor:
        tasks, batch, positions, k = self.a.shape
        d = self.b.shape[-1]
        rows = batch * tasks
        pairwise_cost = (batch * positions) ** 2 * d + (rows * positions) ** 2 * k
        materialized_cost = rows * positions * k * d + rows * rows * k * d
        if (rows * positions) ** 2 <= _MAX_PAIRWISE_ELEMENTS and pairwise_cost <= materialized_cost:
            return _pairwise_gramian(self.a, self.b.reshape(batch * positions, d).mT)
        per_row = torch.einsum("tbsk,bsd->btkd", self.a, self.b).reshape(rows, k * d)
        return per_row @ per_row.T

    def weighted_grad(self, weights: Tensor) -> Tensor:
        weighted = torch.einsum("tbsk,bt->bsk", self.a, weights.to(self.a.dtype))
        k, d = weighted.shape[-1], self.b.shape[-1]
        return (weighted.reshape(-1, k).T @ self.b.reshape(-1, d)).reshape(self.shape)


@dataclass
class EmbeddingTerm(Term):
    """``g[i, t] = Σₛ onehot(idx[i, s]) ⊗ a[t, i, s]``: rows of an embedding table."""

    a: Tensor  # [T, B, S, k], zero where idx is the padding index
    idx: Tensor  # [B, S]
    shape: tuple[int, ...]

    def gramian(self) -> Tensor:
        flat = self.idx.reshape(-1)
        same_row = (flat[:, None] == flat[None, :]).to(self.a.dtype)
        return _pairwise_kernel_gramian(self.a, same_row)

    def weighted_grad(self, weights: Tensor) -> Tensor:
        weighted = torch.einsum("tbsk,bt->bsk", self.a, weights.to(self.a.dtype))
        table = weighted.new_zeros(self.shape)
        return table.index_add_(0, self.idx.reshape(-1), weighted.reshape(-1, self.shape[-1]))


def _pairwise_gramian(a: Tensor, b_t: Tensor) -> Tensor:
    """``G[(i,t),(j,u)] = Σₛᵣ (bᵢₛ·bⱼᵣ)(a[t,i,s]·a[u,j,r])``, never forming per-row gradients."""
    return _pairwise_kernel_gramian(a, b_t.T @ b_t)


def _pairwise_kernel_gramian(a: Tensor, kernel: Tensor) -> Tensor:
    tasks, batch, positions, k = a.shape
    if tasks == 1 and positions == 1:  # one row per instance: a Hadamard product of two Gramians
        rows = a.reshape(batch, k)
        return (rows @ rows.T) * kernel
    a_rows = a.permute(1, 0, 2, 3).reshape(batch * tasks * positions, k)
    products = (a_rows @ a_rows.T).view(batch, tasks, positions, batch, tasks, positions)
    products = products * kernel.view(batch, 1, positions, batch, 1, positions)
    return products.sum(dim=(2, 5)).reshape(batch * tasks, batch * tasks)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def to_instances(tensor: Tensor, batch_dim: int | None, offset: int = 0) -> Tensor:
    """Moves the batch dim (after ``offset`` leading dims) to position ``offset``.

    ``batch_dim=None`` means the whole tensor belongs to one instance (batch size 1).
    """
    if batch_dim is None:
        return tensor.unsqueeze(offset)
    return tensor.movedim(offset + batch_dim, offset)


def candidate_batch_dims(
    rule: str, module: nn.Module, x: Tensor, y_shape: tuple[int, ...]
) -> list[int]:
    """Dims of the call's output that may hold the instances, from the layer's semantics.

    Convolutions and GroupNorm process instances along dim 0 only; Linear, Embedding and
    LayerNorm along any leading dim (the trailing ones are features).
    """
    if rule in ("conv", "group_norm"):
        spatial = len(y_shape) - 2
        if rule == "conv":
            assert isinstance(module, nn.modules.conv._ConvNd)
            spatial = len(module.kernel_size)
        return [0] if len(y_shape) == spatial + 2 else []
    if rule == "layer_norm":
        assert isinstance(module, nn.LayerNorm)
        lead = len(y_shape) - len(module.normalized_shape)
    elif rule == "linear":
        lead = len(y_shape) - 1
    else:  # embedding
        lead = len(y_shape) - 1
    return list(range(lead))


def build_terms(
    module: nn.Module,
    rule: str,
    calls: list[tuple[Tensor, Tensor, int | None]],
    dtype: torch.dtype,
) -> dict[str, Term]:
    """Terms of ``module``'s direct parameters, keyed by parameter name.

    ``calls`` holds, per call, the saved input ``x``, the task gradients ``dY`` ``[T, *y.shape]``
    and the verified batch dim of ``y`` (``None`` for batch size 1).
    """
    if rule == "linear":
        assert isinstance(module, nn.Linear)
        return _linear_terms(module, calls, dtype)
    if rule == "conv":
        assert isinstance(module, nn.modules.conv._ConvNd)
        return _conv_terms(module, calls, dtype)
    if rule == "embedding":
        assert isinstance(module, nn.Embedding)
        return _embedding_terms(module, calls, dtype)
    if rule == "layer_norm":
        assert isinstance(module, nn.LayerNorm)
        return _layer_norm_terms(module, calls, dtype)
    assert isinstance(module, nn.GroupNorm)
    return _group_norm_terms(module, calls, dtype)


def _instance_rows(
    x: Tensor, dy: Tensor, batch_dim: int | None, k: int, d: int
) -> tuple[Tensor, Tensor]:
    """``a [T, B, S, k]`` from ``dY`` and ``b [B, S, d]`` from ``x``, positions flattened."""
    a = to_instances(dy, batch_dim, offset=1)
    b = to_instances(x, batch_dim)
    return a.reshape(a.shape[0], a.shape[1], -1, k), b.reshape(b.shape[0], -1, d)


def _bias_term(a: Tensor, shape: tuple[int, ...]) -> MaterializedTerm:
    sums = a.sum(dim=2)  # [T, B, k]
    return MaterializedTerm(sums.transpose(0, 1).reshape(-1, sums.shape[-1]), shape)


def _linear_terms(
    module: nn.Linear, calls: list[tuple[Tensor, Tensor, int | None]], dtype: torch.dtype
) -> dict[str, Term]:
    k, d = module.out_features, module.in_features
    parts = [_instance_rows(x.to(dtype), dy.to(dtype), bd, k, d) for x, dy, bd in calls]
    a = _cat([p[0] for p in parts], dim=2)
    b = _cat([p[1] for p in parts], dim=1)
    terms: dict[str, Term] = {"weight": OuterTerm(a, b, (k, d))}
    if module.bias is not None:
        terms["bias"] = _bias_term(a, (k,))
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


def _conv_terms(
    module: nn.modules.conv._ConvNd,
    calls: list[tuple[Tensor, Tensor, int | None]],
    dtype: torch.dtype,
) -> dict[str, Term]:
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
        terms["bias"] = _bias_term(a, (k,))
    return terms


def _embedding_terms(
    module: nn.Embedding, calls: list[tuple[Tensor, Tensor, int | None]], dtype: torch.dtype
) -> dict[str, Term]:
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
    return {"weight": EmbeddingTerm(_cat(a_parts, 2), _cat(idx_parts, 1), shape)}


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


def _layer_norm_terms(
    module: nn.LayerNorm, calls: list[tuple[Tensor, Tensor, int | None]], dtype: torch.dtype
) -> dict[str, Term]:
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
        return (
            {"bias": _affine_terms(grads, grads, shape, False)["weight"]}
            if module.bias is not None
            else {}
        )
    return _affine_terms(products, grads, shape, module.bias is not None)


def _group_norm_terms(
    module: nn.GroupNorm, calls: list[tuple[Tensor, Tensor, int | None]], dtype: torch.dtype
) -> dict[str, Term]:
    channels = module.num_channels
    products, grads = [], []
    for x, dy, bd in calls:
        normalized = F.group_norm(x.to(dtype), module.num_groups, None, None, module.eps)
        xhat = normalized.reshape(normalized.shape[0], channels, -1)  # [N, C, positions]
        a = dy.to(dtype).reshape(dy.shape[0], dy.shape[1], channels, -1)
        if bd is None:  # batch size 1: all N samples of the layer belong to the one instance
            xhat = xhat.transpose(0, 1).reshape(1, channels, -1)
            a = a.transpose(1, 2).reshape(a.shape[0], 1, channels, -1)
        products.append((a * xhat).sum(dim=-1))
        grads.append(a.sum(dim=-1))
    if not module.affine:
        return {}
    return _affine_terms(products, grads, (channels,), True)
