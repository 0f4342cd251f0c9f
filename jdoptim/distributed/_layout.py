"""Step headers (what every rank announces first) and where a rank's losses sit in the global ones."""

from __future__ import annotations

import enum
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from jdoptim.distributed._communicator import at_offset

MAX_LOSS_DIMS = 8


class StepKind(enum.IntEnum):
    """The kind of step a rank runs; ranks running different kinds get a clear error."""

    ENGINE = 1
    WEIGHTS = 2
    JACOBIAN = 3
    SCALARIZER = 4
    MULTI_TASK = 5
    EVALUATE = 6
    TASKS = 7


@dataclass(frozen=True)
class Layout:
    """Where this rank's losses sit in the global losses (concatenated along ``dim``)."""

    shape: tuple[int, ...]
    dim: int
    offset: int
    size: int

    def local_slice(self, weights: Tensor) -> Tensor:
        return weights.narrow(self.dim, self.offset, self.size)

    def place(self, losses: Tensor) -> Tensor:
        """This rank's losses in zeros of the global shape (summed over ranks: the global losses)."""
        return at_offset(losses, self.shape, self.dim, self.offset)


def header(kind: StepKind, losses: Tensor | None, forms: int = 0, method: int = 0) -> list[int]:
    """``[kind, ndim, *shape, 0..., forms]``, the same length for any losses (zeros for none).

    ``forms`` is a digest of the forms of the engine's terms (:func:`forms_digest`), so ranks learn
    that theirs differ before any factor moves; ``method`` (:func:`method_code`) rides in the
    kind's entry, above its low byte, so ranks learn that they combine the losses differently.
    """
    entry = int(kind) | (method << 8)
    if losses is None:
        return [entry, *([0] * (MAX_LOSS_DIMS + 1)), forms]
    if losses.ndim > MAX_LOSS_DIMS:
        raise ValueError(f"Distributed steps support losses of up to {MAX_LOSS_DIMS} dims.")
    padding = [0] * (MAX_LOSS_DIMS - losses.ndim)
    return [entry, losses.ndim, *losses.shape, *padding, forms]


def method_code(method: nn.Module) -> int:
    """A number naming the classes of a method's modules (UPGrad, MGDA...; an aggregator and its
    weighting), the same on every rank: ranks that weigh differently learn it from the header.
    Hyper-parameters are left out, since a module's repr may show per-process values."""
    names = "|".join(type(module).__name__ for module in method.modules())
    return zlib.crc32(names.encode()) & 0xFFFFFF


def form_code(form: object) -> int:
    """A number naming the form (the class) of an engine term, the same on every rank."""
    return zlib.crc32(type(form).__name__.encode())


def forms_digest(forms: Sequence[object]) -> int:
    """A number naming the forms of a sequence of terms, in order, the same on every rank."""
    return zlib.crc32("|".join(type(form).__name__ for form in forms).encode())


def shapes_of(headers: list[list[int]]) -> list[tuple[int, ...]]:
    """The losses' shapes from every rank's header; the ranks must run the same kind of step."""
    kinds = {h[0] & 0xFF for h in headers}
    if len(kinds) != 1:
        names = sorted(_kind_name(k) for k in kinds)
        raise ValueError(
            f"The ranks run different kinds of steps ({names}): every rank must build its "
            "optimizer with the same method and options."
        )
    if len({h[0] >> 8 for h in headers}) != 1:
        raise ValueError(
            "The ranks' optimizers combine the losses with different methods (for instance UPGrad "
            "on one rank, MGDA on another): every rank must build its optimizer with the same "
            "method and options."
        )
    return [tuple(h[2 : 2 + h[1]]) for h in headers]


def same_shapes(shapes: list[tuple[int, ...]], what: str) -> None:
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(f"{what}; got shapes {shapes}.")


def layout_of(shapes: list[tuple[int, ...]], batch_dim: int | None, rank: int) -> Layout | None:
    """The layout of the global losses from every rank's shape; ``None`` for scalar losses.

    Decided from every rank's losses shape, so every rank decides (or raises) alike.
    """
    if len({len(shape) for shape in shapes}) != 1:
        raise ValueError(
            f"The ranks returned losses with different numbers of dims: {shapes}; every rank "
            "must return losses of the same kind."
        )
    if not shapes[0]:
        return None
    dim = (0 if batch_dim is None else batch_dim) % len(shapes[0])
    rest = {tuple(s for d, s in enumerate(shape) if d != dim) for shape in shapes}
    if len(rest) != 1:
        raise ValueError(
            f"The ranks' losses differ outside the instance dim {dim}: shapes {shapes}. Only "
            "the number of instances may differ between ranks."
        )
    sizes = [shape[dim] for shape in shapes]
    global_shape = list(shapes[0])
    global_shape[dim] = sum(sizes)
    return Layout(tuple(global_shape), dim, sum(sizes[:rank]), sizes[rank])


def _kind_name(code: int) -> str:
    try:
        return StepKind(code).name.lower()
    except ValueError:
        return "?"
