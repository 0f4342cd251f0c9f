"""The micro-batches of one gradient-accumulation window, and the ``.grad`` they wrote."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from jdoptim._grad_layout import lay_out_grads
from jdoptim.paths import Part


class AccumulationWindow:
    """The micro-batches given to ``backward`` since the last step, and the ``.grad`` they wrote.

    Each ``backward`` rewrites ``.grad`` as ``base + direction(all micro-batches)``, where ``base``
    is what ``.grad`` held when the window opened. If every ``.grad`` was reset since the last
    ``backward`` (``zero_grad()``, in place or not), the next one opens a new window on it, as
    torch's ``.grad`` accumulates. If only some were, the window goes on for the others (they get
    the direction of all the window's micro-batches) and keeps each edit (:meth:`adopt_edits`).
    """

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.base: list[Tensor | None] = []
        self.written = GradSnapshot([])
        #: ``.grad`` the user cleared mid-window (``None``, or a zero tensor), by parameter index.
        self.cleared: dict[int, Tensor | None] = {}
        self.finite = True
        self.base_finite = True
        #: The method's state when the window opened (each backward weighs from it again).
        self.method_state: dict[str, Any] | None = None

    def clear(self) -> None:
        self.parts, self.base, self.written = [], [], GradSnapshot([])
        self.cleared = {}
        self.finite = True
        self.method_state = None

    def interrupted(self, params: list[Tensor]) -> bool:
        return not self.parts or self.written.all_reset(params)

    def adopt_edits(self, params: list[Tensor]) -> None:
        """Keeps what was done to some ``.grad`` since the last ``backward`` of the window: a
        ``.grad`` cleared (set to ``None`` or zeroed: a parameter frozen between micro-batches)
        stays so for the rest of the window; one replaced by another tensor keeps the difference
        from what the window wrote, as an addition to its base. In-place edits that are no reset
        (clipping, unscaling) are not kept: the next ``backward`` rewrites the whole direction."""
        for index, param in enumerate(params):
            change = self.written.change(index, param)
            if change == "cleared":
                self.cleared[index] = param.grad
            elif change == "replaced":
                assert param.grad is not None
                written, base = self.written.grads[index], self.base[index]
                # What the window's micro-batches put there (nothing while it held None).
                direction = None if written is None or base is None else written - base
                direction = written if base is None else direction
                self.base[index] = param.grad if direction is None else param.grad - direction
                self.cleared.pop(index, None)
        self.written = GradSnapshot(params)

    def open(self, params: list[Tensor]) -> None:
        """Starts a window on what ``.grad`` holds now; a non-finite base (the NaN ``.grad`` of a
        skipped ``backward`` the user did not zero) keeps the whole window non-finite."""
        self.parts = []
        self.base = [p.grad for p in params]
        self.written = GradSnapshot(params)
        self.cleared = {}
        # A sparse .grad (nn.Embedding(sparse=True)) is finite where its stored values are.
        held = [g._values() if g.is_sparse else g for g in self.base if g is not None]
        self.base_finite = not held or bool(
            torch.stack([torch.isfinite(grad).all() for grad in held]).all()
        )

    def restore(self, params: list[Tensor]) -> None:
        for param, grad in zip(params, self.written.grads, strict=True):
            param.grad = grad

    def write(self, params: list[Tensor]) -> None:
        for index, (param, base) in enumerate(zip(params, self.base, strict=True)):
            if index in self.cleared:
                param.grad = self.cleared[index]
            elif base is not None:
                param.grad = base.clone() if param.grad is None else param.grad + base
        lay_out_grads(params)
        self.written = GradSnapshot(params)


class GradSnapshot:
    """The ``.grad`` tensors of some parameters and their versions (in-place changes bump it)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.grads = [p.grad for p in params]
        self.versions = [None if g is None else _version(g) for g in self.grads]

    def all_reset(self, params: list[Tensor]) -> bool:
        """Whether every ``.grad`` the snapshot holds was reset since (``zero_grad()``: set to
        ``None`` or zeroed, in place or not), or the parameters are others."""
        if len(params) != len(self.grads):
            return True
        changes = [self.change(index, param) for index, param in enumerate(params)]
        held = [c for c, g in zip(changes, self.grads, strict=True) if g is not None]
        return bool(held) and all(c == "cleared" for c in held) and "replaced" not in changes

    def change(self, index: int, param: Tensor) -> str:
        """What happened to ``param.grad`` since the snapshot: ``"same"`` (untouched, or changed in
        place to something non-zero: clipping, unscaling), ``"cleared"`` (now ``None`` or zero,
        where it held a tensor), or ``"replaced"`` (another, non-zero tensor)."""
        grad, version, now = self.grads[index], self.versions[index], param.grad
        if now is grad and (grad is None or _version(grad) == version):
            return "same"
        if now is None or not bool(_values(now).any()):
            return "cleared" if grad is not None else "same"
        return "same" if now is grad else "replaced"

    def accumulated(self, params: list[Tensor]) -> bool:
        """Whether a backward pass added to some ``.grad`` since the snapshot: a new tensor, or the
        same one changed in place to something non-zero (zeroing it in place adds nothing)."""
        for param, grad, version in zip(params, self.grads, self.versions, strict=True):
            now = param.grad
            if now is None or (now is grad and _version(now) == version):
                continue
            if now is not grad:
                return True
            if bool(_values(now).any()):
                return True
        return False


def _version(grad: Tensor) -> int:
    """``grad``'s version counter; -1 for a tensor made under ``inference_mode`` (a ``.grad``
    filled by a backward pass run there), which has none: only its replacement is seen."""
    return -1 if grad.is_inference() else grad._version


def _values(grad: Tensor) -> Tensor:
    """The stored values of a gradient (a sparse one's, from ``nn.Embedding(sparse=True)``)."""
    return grad._values() if grad.is_sparse else grad


class DifferentiatedLosses:
    """The loss tensors already given to ``backward``, held weakly (by identity, not value).

    torch frees a graph after its backward, so a second ``loss.backward()`` raises; jdoptim's
    passes retain the graph, so without this a second ``backward`` on the same losses would
    silently add them twice.
    """

    def __init__(self) -> None:
        # By id: a tensor's == is elementwise. An entry goes when its tensor is freed.
        self._seen: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()

    def check(self, losses: Any) -> None:
        if any(self._seen.get(id(tensor)) is tensor for tensor in _tensors(losses)):
            raise RuntimeError(
                "backward() was already called on these losses. torch frees a graph after its "
                "backward and raises on a second one; jdoptim refuses it too rather than add the "
                "same losses twice. Run the forward pass again for another micro-batch."
            )

    def add(self, losses: Any) -> None:
        for tensor in _tensors(losses):
            self._seen[id(tensor)] = tensor


def _tensors(losses: Any) -> list[Tensor]:
    """The tensors of ``losses``: one tensor, or a list or tuple of per-task tensors."""
    items = losses if isinstance(losses, list | tuple) else [losses]
    return [item for item in items if isinstance(item, Tensor)]
