"""Closed form for self-attention (``nn.MultiheadAttention`` with ``query is key is value``).

The attention layer is ``Y = A W_outᵀ + b_out`` with ``A = attention(X W_inᵀ + b_in)``, two linear
maps around an instance-wise core. Recomputing the core on the whole batch from the saved input
``X`` gives ``A``; one backward pass of the core with ``dA = dY W_out`` gives ``dQKV`` at the input
projection, instance by instance (instances are independent inside attention). Both projections
then have per-instance gradients ``Σₗ dYᵢₗ ⊗ Aᵢₗ`` and ``Σₗ dQKVᵢₗ ⊗ Xᵢₗ``: the same factored terms
as a ``Linear`` layer, without per-instance gradient rows in memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram._terms import BiasTerm, OuterTerm, Term

_ARGUMENTS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def attention_terms(
    module: nn.Module,
    inputs: Any,
    gradient: Tensor,
    output_dim: int,
    batch: int,
    dtype: torch.dtype,
) -> dict[str, Term] | None:
    """Terms of the attention layer's parameters, or ``None`` outside the supported case.

    ``gradient`` is ``[T, *y.shape]``, the tasks' gradients at the layer's output, whose instances
    lie along ``output_dim``.
    """
    if not isinstance(module, nn.MultiheadAttention) or not _plain(module):
        return None
    args, kwargs = inputs
    bound: dict[str, Any] = dict(zip(_ARGUMENTS, args, strict=False)) | dict(kwargs)
    query: object = bound["query"]
    if not isinstance(query, Tensor):
        return None
    x: Tensor = query
    if any(bound.get(name) is not query for name in ("key", "value")):
        return None  # cross-attention: the replay route
    if bound.get("is_causal", False) or x.ndim != 3:
        return None
    expected_dim = 0 if module.batch_first else 1
    if output_dim != expected_dim or x.shape[expected_dim] != batch:
        return None
    x = x if module.batch_first else x.transpose(0, 1)  # [B, L, E]
    mask = _additive_mask(bound.get("attn_mask"), bound.get("key_padding_mask"), x, dtype)
    if mask is False:
        return None
    assert not isinstance(mask, bool)
    x = x.to(dtype)
    in_weight = module.in_proj_weight.detach().to(dtype)
    in_bias = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(dtype)
    out_weight = module.out_proj.weight.detach().to(dtype)
    with torch.enable_grad():
        qkv = F.linear(x, in_weight, in_bias).detach().requires_grad_()
        attended = _core(qkv, module.num_heads, mask)
    tasks = gradient.shape[0]
    dy = gradient.to(dtype).movedim(1 + output_dim, 1)  # [T, B, L, E]
    d_attended = dy @ out_weight
    if tasks == 1:
        (d_qkv,) = torch.autograd.grad(attended, qkv, d_attended[0])
        d_qkv = d_qkv.unsqueeze(0)
    else:
        (d_qkv,) = torch.autograd.grad(attended, qkv, d_attended, is_grads_batched=True)
    terms: dict[str, Term] = {
        "in_proj_weight": OuterTerm(d_qkv, x, tuple(in_weight.shape)),
        "out_proj.weight": OuterTerm(dy, attended.detach(), tuple(out_weight.shape)),
    }
    if in_bias is not None:
        terms["in_proj_bias"] = BiasTerm(d_qkv, tuple(in_bias.shape))
    if module.out_proj.bias is not None:
        terms["out_proj.bias"] = BiasTerm(dy, tuple(module.out_proj.bias.shape))
    return terms


def _plain(module: nn.MultiheadAttention) -> bool:
    """One packed input projection, no extra key/value biases or zero attention."""
    return (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and not (module.dropout > 0 and module.training)
    )


def _additive_mask(
    attn_mask: object, key_padding_mask: object, x: Tensor, dtype: torch.dtype
) -> Tensor | bool | None:
    """The masks as one additive ``[B or 1, 1, L, S]`` tensor (``False``: unsupported masks)."""
    total: Tensor | None = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.ndim != 2:
            return False
        total = _as_additive(attn_mask, dtype)[None, None]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.ndim != 2:
            return False
        padding = _as_additive(key_padding_mask, dtype)[:, None, None, :]
        total = padding if total is None else total + padding
    return total


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _core(qkv: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """``softmax(Q Kᵀ / √d + mask) V`` per head, from ``[B, L, 3E]`` to ``[B, L, E]``."""
    batch, length, width = qkv.shape
    embed = width // 3
    head_dim = embed // heads
    q, k, v = (
        part.reshape(batch, length, heads, head_dim).transpose(1, 2)
        for part in qkv.chunk(3, dim=-1)
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores + mask
    attended = torch.softmax(scores, dim=-1) @ v  # [B, h, L, d]
    return attended.transpose(1, 2).reshape(batch, length, embed)
