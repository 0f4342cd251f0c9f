"""Preference vectors: the weights a method gives the objectives when they do not conflict."""

from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.linalg import check_finite, check_tensor


def check_pref_vector(pref_vector: Tensor | None) -> Tensor | None:
    """Validates a user-given preference vector (1-D, finite, non-negative, not all zero)."""
    if pref_vector is None:
        return None
    check_tensor(pref_vector, "pref_vector")
    if pref_vector.ndim != 1 or pref_vector.numel() == 0:
        raise ValueError(
            f"pref_vector must be a non-empty 1-D tensor (one weight per objective), got shape "
            f"{tuple(pref_vector.shape)}."
        )
    check_finite(pref_vector, "pref_vector")
    if bool((pref_vector < 0).any()) or not bool((pref_vector > 0).any()):
        raise ValueError("pref_vector must be non-negative with at least one positive entry.")
    return pref_vector.detach().clone()


def pref_weights(pref_vector: Tensor | None, like: Tensor) -> Tensor:
    """The preference for ``m = like.shape[0]`` objectives, on ``like``'s device and dtype.

    ``None`` means the uniform vector ``[1/m, ..., 1/m]``.
    """
    rows = like.shape[0]
    if pref_vector is None:
        return torch.full((rows,), 1.0 / rows, dtype=like.dtype, device=like.device)
    if pref_vector.shape[0] != rows:
        raise ValueError(
            f"pref_vector has {pref_vector.shape[0]} entries but there are {rows} objectives; give "
            "one preference per row of the Jacobian."
        )
    return pref_vector.to(dtype=like.dtype, device=like.device)
