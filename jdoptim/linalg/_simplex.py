"""Problems over the probability simplex ``Δ = {w : w ≥ 0, Σ w = 1}``."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from jdoptim.linalg._gramian import normalize_gramian, regularize_gramian
from jdoptim.linalg._quadprog import inverse_cholesky_factor, solve_qp


def min_norm_on_simplex(gramian: Tensor, reg_eps: float = 1e-10) -> Tensor:
    """Returns ``argmin_{w ∈ Δ} wᵀ G w``: the weights of the min-norm point of the rows' hull.

    This is MGDA's subproblem (Désidéri, 2012). It is solved exactly (active set, quadprog) on the
    trace-normalised Gramian plus ``reg_eps * I``; the tiny default keeps the point exact to about
    ``1e-8`` while making the problem strictly convex.
    """
    size = gramian.shape[0]
    matrix = regularize_gramian(normalize_gramian((gramian + gramian.T) / 2), reg_eps)
    matrix_np = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    constraints = np.concatenate([np.ones((size, 1)), np.eye(size)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(size)])
    weights = solve_qp(
        inverse_cholesky_factor(matrix_np), np.zeros(size), constraints, bounds, n_equalities=1
    )
    weights = np.maximum(weights, 0.0)
    weights /= weights.sum()
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


def project_onto_simplex(vectors: Tensor) -> Tensor:
    """Euclidean projection of each vector (along the last dim) onto the simplex ``Δ``.

    Sort-based algorithm of Held, Wolfe & Crowder (1974) / Duchi et al. (2008), ``O(m log m)``.
    The projection commutes with adding a constant to every entry, so each vector is first
    shifted to a maximum of 0: the running sums then stay small and keep the ``- 1`` of the
    constraint ``Σ w = 1``, whatever the vectors' magnitude (beyond ``1/eps`` of the dtype they
    would round it away and return weights summing to far more than 1).
    """
    size = vectors.shape[-1]
    if size == 0:
        return vectors.clone()
    vectors = vectors - vectors.max(dim=-1, keepdim=True).values
    sorted_desc = torch.sort(vectors, dim=-1, descending=True).values
    cumulative = sorted_desc.cumsum(dim=-1) - 1
    ranks = torch.arange(1, size + 1, dtype=vectors.dtype, device=vectors.device)
    condition = sorted_desc - cumulative / ranks > 0
    # Index of the last True; condition[..., 0] is always True.
    last = size - 1 - torch.flip(condition, dims=[-1]).to(torch.int64).argmax(dim=-1, keepdim=True)
    threshold = cumulative.gather(-1, last) / (last + 1).to(vectors.dtype)
    return torch.clamp(vectors - threshold, min=0)
