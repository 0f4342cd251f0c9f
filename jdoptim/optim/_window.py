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
    is what ``.grad`` held when the window opened. If ``.grad`` is no longer what the window wrote
    (the user replaced it, or zeroed it in place: ``zero_grad(set_to_none=False)``, ``zero_()``),
    the next ``backward`` opens a new window on it, as torch's ``.grad`` accumulates.
    """

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.base: list[Tensor | None] = []
        self.written = GradSnapshot([])
        self.finite = True
        self.base_finite = True
        #: The method's state when the window opened (each backward weighs from it again).
        self.method_state: dict[str, Any] | None = None

    def clear(self) -> None:
        self.parts, self.base, self.written = [], [], GradSnapshot([])
        self.finite = True
        self.method_state = None

    def interrupted(self, params: list[Tensor]) -> bool:
        return not self.parts or self.written.differs(params)

    def open(self, params: list[Tensor]) -> None:
        """Starts a window on what ``.grad`` holds now; a non-finite base (the NaN ``.grad`` of a
        skipped ``backward`` the user did not zero) keeps the whole window non-finite."""
        self.parts = []
        self.base = [p.grad for p in params]
        self.written = GradSnapshot(params)
        # A sparse .grad (nn.Embedding(sparse=True)) is finite where its stored values are.
        held = [g._values() if g.is_sparse else g for g in self.base if g is not None]
        self.base_finite = not held or bool(
            torch.stack([torch.isfinite(grad).all() for grad in held]).all()
        )

    def restore(self, params: list[Tensor]) -> None:
        for param, grad in zip(params, self.written.grads, strict=True):
            param.grad = grad

    def write(self, params: list[Tensor]) -> None:
        for param, base in zip(params, self.base, strict=True):
            if base is not None:
                param.grad = base.clone() if param.grad is None else param.grad + base
        lay_out_grads(params)
        self.written = GradSnapshot(params)


class GradSnapshot:
    """The ``.grad`` tensors of some parameters and their versions (in-place changes bump it)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.grads = [p.grad for p in params]
        self.versions = [None if g is None else g._version for g in self.grads]

    def differs(self, params: list[Tensor]) -> bool:
        """Whether ``.grad`` was replaced, or reset in place, since the snapshot: some tensor is
        another one, or every tensor changed in place is now zero (``zero_grad(set_to_none=False)``,
        ``zero_()``). Other in-place changes (clipping, unscaling) do not count: the next
        ``backward`` rewrites the window's direction anyway, and clipping after the last one clips
        the real direction."""
        if len(params) != len(self.grads):
            return True
        edited = []
        for param, grad, version in zip(params, self.grads, self.versions, strict=True):
            if param.grad is not grad:
                return True
            if grad is not None and grad._version != version:
                edited.append(grad._values() if grad.is_sparse else grad)
        return bool(edited) and not any(bool(grad.any()) for grad in edited)

    def accumulated(self, params: list[Tensor]) -> bool:
        """Whether a backward pass added to some ``.grad`` since the snapshot: a new tensor, or the
        same one changed in place to something non-zero (zeroing it in place adds nothing)."""
        for param, grad, version in zip(params, self.grads, self.versions, strict=True):
            now = param.grad
            if now is None or (now is grad and now._version == version):
                continue
            if now is not grad:
                return True
            values = now._values() if now.is_sparse else now
            if bool(values.any()):
                return True
        return False


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
