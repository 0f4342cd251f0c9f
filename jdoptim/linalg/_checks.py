"""Input validation shared by every layer: one place for the messages users see."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tensor(value: object, name: str) -> Tensor:
    """Returns ``value`` if it is a floating-point tensor, else raises ``TypeError``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float32 or float64), got {value.dtype}."
        )
    return value


def check_finite(tensor: Tensor, name: str) -> None:
    """Raises ``ValueError`` if ``tensor`` holds a NaN or an infinity.

    Only the two extremes are examined: NaN propagates through ``aminmax`` and an infinity is the
    minimum or the maximum, so this needs no temporary as large as ``tensor`` (Jacobians are big).
    """
    if tensor.numel() > 0 and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
        raise ValueError(
            f"{name} contains NaN or infinite entries; check the losses and the learning rate "
            "(a diverging model is the usual cause)."
        )


def check_matrix(matrix: object, name: str = "matrix", *, finite: bool = True) -> Tensor:
    """Checks that ``matrix`` is a floating-point tensor of shape ``[m, n]`` with ``m >= 1``, and
    finite unless ``finite=False`` (for callers that fold that check into a later one)."""
    tensor = check_tensor(matrix, name)
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 2-dimensional with shape [m, n], got shape {tuple(tensor.shape)}."
        )
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (m >= 1), got shape [0, n].")
    if finite:
        check_finite(tensor, name)
    return tensor


def check_square(matrix: object, name: str = "matrix", *, finite: bool = True) -> Tensor:
    """Checks :func:`check_matrix` and that the matrix is square."""
    tensor = check_matrix(matrix, name, finite=finite)
    if tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(tensor.shape)}.")
    return tensor


def symmetry_tolerance(dtype: torch.dtype) -> float:
    """Relative asymmetry tolerated in a Gramian: about the square root of machine epsilon."""
    return math.sqrt(torch.finfo(dtype).eps)


def check_gramian(gramian: object, name: str = "gramian") -> Tensor:
    """Checks that ``gramian`` is a finite, square, symmetric matrix (a Gramian ``J Jᵀ``).

    Beyond symmetry it rejects what cannot be ``J Jᵀ``: a negative diagonal entry (a squared norm),
    or an entry breaking Cauchy-Schwarz, ``|Gᵢⱼ| ≤ sqrt(Gᵢᵢ Gⱼⱼ)`` (two O(m²) necessary conditions of
    positive semi-definiteness). Every verdict is computed on the tensor's device and read in one
    host copy, so a valid Gramian costs one synchronisation on a GPU; the details of a failure are
    read only to word its message.
    """
    tensor = check_square(gramian, name, finite=False)
    if tensor.numel() == 0:
        return tensor
    diagonal = tensor.diagonal()
    norms = diagonal.clamp(min=0).sqrt()
    # A Gramian's largest entry is on its diagonal (given Cauchy-Schwarz, checked here), so the
    # diagonal sets the scale of the tolerance without a pass over every entry.
    scale = diagonal.abs().amax()
    tolerance = symmetry_tolerance(tensor.dtype) * scale
    asymmetry = (tensor - tensor.T).abs().amax()
    excess = (tensor.abs() - norms[:, None] * norms[None, :]).amax()
    # One host read for the three conditions; a NaN anywhere reaches ``worst`` and fails it.
    worst = torch.maximum(torch.maximum(asymmetry, excess), -diagonal.amin())
    if bool(worst <= tolerance):
        return tensor
    check_finite(tensor, name)
    if not bool(asymmetry <= tolerance):
        raise ValueError(
            f"{name} must be symmetric (a Gramian J Jᵀ), but its largest asymmetry is "
            f"{float(asymmetry):.3g} for diagonal entries of size {float(scale):.3g}. For a "
            "non-symmetric matrix (such as J1 J2ᵀ), use a weighting that accepts one."
        )
    if not bool(diagonal.amin() >= -tolerance):
        raise ValueError(
            f"{name} has a negative diagonal entry ({float(diagonal.min()):.3g}); the diagonal of "
            "a Gramian J Jᵀ holds squared norms, so it is not a Gramian."
        )
    raise ValueError(
        f"{name} is not positive semi-definite: an off-diagonal entry exceeds the geometric "
        "mean of its diagonal entries (Cauchy-Schwarz), so it is not a Gramian J Jᵀ."
    )


def check_generalized_gramian(gramian: object, name: str = "generalized gramian") -> Tensor:
    """Checks a generalized Gramian of shape ``[m1, ..., mk, mk, ..., m1]`` (k >= 0)."""
    tensor = check_tensor(gramian, name)
    if tensor.ndim % 2 != 0:
        raise ValueError(
            f"{name} must have an even number of dimensions [m1, ..., mk, mk, ..., m1], got "
            f"shape {tuple(tensor.shape)}."
        )
    k = tensor.ndim // 2
    shape = tuple(tensor.shape)
    if shape[:k] != shape[k:][::-1]:
        raise ValueError(
            f"{name} must have shape [m1, ..., mk, mk, ..., m1] (second half reversed), got "
            f"{shape}."
        )
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {shape}.")
    check_finite(tensor, name)
    return tensor
