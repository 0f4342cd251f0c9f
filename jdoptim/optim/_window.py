"""The micro-batches of one gradient-accumulation window, and the ``.grad`` they wrote."""

from __future__ import annotations

import enum
import weakref
from typing import Any

import torch
from torch import Tensor

from jdoptim._grad_layout import lay_out_grads, stored_values
from jdoptim.paths import Part


class AccumulationWindow:
    """The micro-batches given to ``backward`` since the last step, and the ``.grad`` they wrote.

    Each ``backward`` rewrites ``.grad`` as ``base + direction(all micro-batches)``, where ``base``
    is what ``.grad`` held when the window opened. If every ``.grad`` was reset since the last
    ``backward`` (``zero_grad()``, in place or not), the next one opens a new window on it, as
    torch's ``.grad`` accumulates. If only some were, the window goes on for the others (they get
    the direction of all the window's micro-batches) and keeps each edit (:meth:`resume`).
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

    def resume(self, params: list[Tensor]) -> bool:
        """Takes in what was done to ``.grad`` since the last ``backward``; ``False`` when the
        window must open anew instead (no micro-batch yet, other parameters, or every ``.grad``
        reset: ``zero_grad()``, in place or not).

        Otherwise, per parameter: a ``.grad`` cleared (set to ``None``, replaced by zeros, or
        zeroed in place where the window wrote a non-zero one: a parameter frozen between
        micro-batches) stays so for the rest of the window; one replaced by another tensor keeps
        the difference from what the window wrote, as an addition to its base. Other in-place
        edits (clipping, unscaling) are not kept: the next ``backward`` rewrites the direction.
        """
        if not self.parts or len(params) != len(self.written.grads):
            return False
        changes = self.written.changes(params)
        if self.written.all_reset(changes):
            return False
        for index, (param, change) in enumerate(zip(params, changes, strict=True)):
            if change is Change.CLEARED:
                self.cleared[index] = param.grad
            elif change is Change.REPLACED:
                assert param.grad is not None
                written, base = self.written.grads[index], self.base[index]
                # What the window's micro-batches put there: nothing while it kept the .grad
                # cleared (or held None), else what it wrote less its base.
                if index in self.cleared or written is None:
                    direction = self.cleared.pop(index, None)
                else:
                    direction = written if base is None else written - base
                self.base[index] = param.grad if direction is None else param.grad - direction
        self.written = GradSnapshot(params)
        return True

    def open(self, params: list[Tensor]) -> None:
        """Starts a window on what ``.grad`` holds now; a non-finite base (the NaN ``.grad`` of a
        skipped ``backward`` the user did not zero) keeps the whole window non-finite."""
        self.parts = []
        self.base = [p.grad for p in params]
        self.written = GradSnapshot(params)
        self.cleared = {}
        # A sparse .grad (nn.Embedding(sparse=True)) is finite where its stored values are.
        held = [stored_values(g) for g in self.base if g is not None]
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
        self.written = GradSnapshot(params, note_zeros=True)


class Change(enum.Enum):
    """What happened to a ``.grad`` since a :class:`GradSnapshot`."""

    SAME = "same"  # untouched, or edited in place (clipping, unscaling)
    ZEROED = "zeroed"  # edited in place to zero where it was zero already
    CLEARED = "cleared"  # None, replaced by zeros, or zeroed in place from non-zero
    REPLACED = "replaced"  # another, non-zero tensor


class GradSnapshot:
    """The ``.grad`` tensors of some parameters and their versions (in-place changes bump it)."""

    def __init__(self, params: list[Tensor], *, note_zeros: bool = False) -> None:
        self.grads = [p.grad for p in params]
        self.versions = [None if g is None else _version(g) for g in self.grads]
        # Which .grad were non-zero (on the device, read only if one is later edited in place):
        # zeroing a non-zero .grad in place is a reset, clipping a zero one is not.
        dense = [(i, g) for i, g in enumerate(self.grads) if g is not None and not g.is_sparse]
        self._slot = {index: slot for slot, (index, _) in enumerate(dense)}
        self._nonzero: Tensor | None = None
        # Plain tensors only: a sharded .grad (DTensor, fully_shard) is judged as a whole, below.
        if note_zeros and dense and all(type(g) is Tensor for _, g in dense):
            self._nonzero = torch.stack(torch._foreach_norm([g for _, g in dense])) > 0

    def edited_in_place(self, index: int, param: Tensor) -> bool:
        grad = self.grads[index]
        return grad is not None and param.grad is grad and _version(grad) != self.versions[index]

    def changes(self, params: list[Tensor]) -> list[Change]:
        """Each parameter's :class:`Change` since the snapshot, with one host read at most (none
        when no ``.grad`` was edited in place or replaced)."""
        changes = [Change.SAME] * len(params)
        checks: list[Tensor] = []  # per entry below: whether the .grad now holds a non-zero
        checked: list[tuple[int, Change]] = []
        for index, param in enumerate(params):
            grad, now = self.grads[index], param.grad
            if now is grad and (grad is None or _version(grad) == self.versions[index]):
                continue
            if now is None:
                changes[index] = Change.CLEARED
                continue
            checks.append(stored_values(now).any())
            checked.append((index, Change.SAME if now is grad else Change.REPLACED))
        if not checks:
            return changes
        if any(type(check) is not Tensor for check in checks):
            return self._judged_one_by_one(changes, checked, checks)
        # Whether an in-place edited .grad was non-zero when written (unknown: taken as yes).
        in_place = [i for i, c in checked if c is Change.SAME]
        known = [i for i in in_place if self._nonzero is not None and i in self._slot]
        if known:
            assert self._nonzero is not None
            checks.extend(self._nonzero[[self._slot[i] for i in known]].unbind())
        values = torch.stack(checks).tolist()  # the one host read
        was_nonzero = dict(zip(known, values[len(checked) :], strict=True))
        for (index, change), now_nonzero in zip(checked, values[: len(checked)], strict=True):
            changes[index] = self._change(index, change, bool(now_nonzero), was_nonzero)
        return changes

    def _judged_one_by_one(
        self, changes: list[Change], checked: list[tuple[int, Change]], checks: list[Tensor]
    ) -> list[Change]:
        """:meth:`changes` for sharded ``.grad`` (DTensor): one read each, agreed by the ranks."""
        for (index, change), check in zip(checked, checks, strict=True):
            changes[index] = self._change(index, change, bool(check), {})
        return changes

    def _change(
        self, index: int, change: Change, now_nonzero: bool, was_nonzero: dict[int, bool]
    ) -> Change:
        if now_nonzero:
            return change
        if self.grads[index] is None:
            return Change.SAME  # None, now zeros: nothing the window wrote was cleared
        if change is Change.REPLACED or was_nonzero.get(index, True):
            return Change.CLEARED
        return Change.ZEROED

    def untouched_zeros(self, params: list[Tensor]) -> set[int]:
        """The indices of the parameters whose ``.grad`` is still the snapshot's, unedited, and
        all zero (a ``zero_grad(set_to_none=False)`` before it); one host read at most."""
        held = [
            (index, param.grad)
            for index, param in enumerate(params)
            if param.grad is not None
            and param.grad is self.grads[index]
            and _version(param.grad) == self.versions[index]
        ]
        if not held:
            return set()
        checks = [stored_values(grad).any() for _, grad in held]
        if all(type(check) is Tensor for check in checks):
            nonzero = torch.stack(checks).tolist()  # the one host read
        else:  # sharded (DTensor) gradients: one read each, agreed by the ranks
            nonzero = [bool(check) for check in checks]
        return {index for (index, _), busy in zip(held, nonzero, strict=True) if not busy}

    def all_reset(self, changes: list[Change]) -> bool:
        """Whether every ``.grad`` the snapshot holds was reset (``zero_grad()``: now ``None`` or
        zero) and no other was given a non-zero tensor."""
        held = [c for c, g in zip(changes, self.grads, strict=True) if g is not None]
        reset = (Change.CLEARED, Change.ZEROED)
        return bool(held) and all(c in reset for c in held) and Change.REPLACED not in changes

    def accumulated(self, params: list[Tensor]) -> bool:
        """Whether a backward pass added to some ``.grad`` since the snapshot: a new tensor, or the
        same one changed in place to something non-zero (zeroing it in place adds nothing)."""
        for param, grad, version in zip(params, self.grads, self.versions, strict=True):
            now = param.grad
            if now is None or (now is grad and _version(now) == version):
                continue
            if now is not grad:
                return True
            if bool(stored_values(now).any()):
                return True
        return False


def _version(grad: Tensor) -> int:
    """``grad``'s version counter; -1 for a tensor made under ``inference_mode`` (a ``.grad``
    filled by a backward pass run there), which has none: only its replacement is seen."""
    return -1 if grad.is_inference() else grad._version


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
