"""The collectives of a distributed Jacobian-descent step, with byte counts and shared failures.

Every collective of a step goes through one :class:`Communicator`, so that (1) the bytes each rank
sends per step are counted, per kind of collective, for the docs and benchmarks, and (2) no rank
can wait forever on a collective that another rank never reaches. Local work runs inside
:meth:`Communicator.guard`, which records an exception instead of raising it; the next collective
carries a failure flag (one more number in a buffer that travels anyway), and when any rank has
failed, every rank raises right after it, before anyone enters the following collective. The
collectives' sizes never depend on local work that may have failed (a failed rank sends zeros).

An overflow under loss scaling (a rank's scaled losses are not finite) is not a failure but a step
that every rank skips: the flag of the step's first exchange says so, and every rank raises
:class:`StepOverflow` right after it, which the optimizer turns into a skipped step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from jdoptim.paths import NonFiniteGramianError


class StepOverflow(NonFiniteGramianError):
    """Raised on every rank, after the same exchange, when the step overflowed on some rank (its
    scaled losses, or rank 0's Gramian, were not finite): under loss scaling, every rank skips it."""


class DistributedStepError(RuntimeError):
    """Raised on every rank when some rank failed during a distributed step."""


class Communicator:
    """``torch.distributed`` collectives over one process group, counted in bytes sent per rank.

    Byte counts follow the usual ring algorithms: an all-gather of ``s`` bytes per rank sends
    ``s (R - 1)`` from each rank, an all-reduce of ``s`` bytes ``2 s (R - 1) / R``.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent: dict[str, int] = {}
        self.error: Exception | None = None
        self.stage = ""
        self.overflow = False
        # NCCL only moves CUDA tensors: the small control tensors live where the backend wants.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )

    def start_step(self) -> None:
        self.bytes_sent = {}
        self.error = None
        self.overflow = False

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)

    def count(self, kind: str, nbytes: float) -> None:
        """Counts ``nbytes`` this rank sent in a collective run outside this class."""
        self._count(kind, nbytes)

    # --- failures ------------------------------------------------------------------------------

    @contextmanager
    def guard(self, stage: str) -> Iterator[None]:
        """Runs local work; an exception is kept (the first one) for the next collective."""
        try:
            yield
        except Exception as error:  # every error must reach the next collective
            if self.error is None:
                self.error = error
                self.stage = stage

    def _flag(self) -> int:
        return 0 if self.error is None else 1

    def _raise_if_any_failed(self, failures: float) -> None:
        """After a collective that summed the flags: raises on every rank if any rank failed."""
        if failures == 0:
            return
        messages: list[str | None] = [None] * self.world_size
        own = None if self.error is None else f"{type(self.error).__name__} in {self.stage}: "
        own = None if own is None else own + str(self.error)
        dist.all_gather_object(messages, own, group=self.group)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        details = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise DistributedStepError(
            f"The distributed Jacobian-descent step failed on another rank ({details}). Every rank "
            "stops this step; parameters and optimizer state are unchanged."
        )

    # --- collectives ---------------------------------------------------------------------------

    def exchange_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), after the failure check.

        The flag is 1 for a failed rank, 2 for a rank whose step overflowed (:attr:`overflow`):
        after a failure every rank raises it, after an overflow :class:`StepOverflow`.
        """
        flag = self._flag() or (_OVERFLOW if self.overflow else 0)
        local = torch.tensor([flag, *values], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        self._count("control", local.numel() * 8 * (self.world_size - 1))
        rows = [g.tolist() for g in gathered]
        self._raise_if_any_failed(sum(row[0] == 1 for row in rows))
        overflowed = [rank for rank, row in enumerate(rows) if row[0] == _OVERFLOW]
        if overflowed:
            self.overflow = False
            raise StepOverflow(
                f"The scaled losses of rank(s) {overflowed} are not finite (a float16 overflow): "
                "every rank skips this step."
            )
        return [row[1:] for row in rows]

    def all_gather_padded(
        self,
        tensors: Sequence[Tensor],
        dims: Sequence[int],
        header: Sequence[int] = (),
        check: Callable[[list[list[int]]], None] | None = None,
    ) -> list[Tensor]:
        """Concatenates each tensor over the ranks along its dim in ``dims``, rank 0 first.

        Ranks may hold different sizes along any dim: every tensor is zero-padded to the largest
        size first, the padding along the concatenation dim is cut off again, and padding along
        other dims stays, as zeros. ``header`` (the same length on every rank) travels with the
        first, small exchange; ``check`` sees every rank's header before any data moves (it must
        decide the same on every rank). Tensors of one dtype travel in one all-gather.
        """
        ndims = [t.ndim for t in tensors]
        headers = self.exchange_ints([len(ndims), sum(ndims), *header])
        if check is not None:
            check([h[2:] for h in headers])
        if any(h[:2] != headers[0][:2] for h in headers):
            raise ValueError(
                "The ranks disagree on the number or the dims of the tensors to exchange: every "
                "rank must run the same model on losses with the same number of dims."
            )
        if not tensors:
            return []
        flat_shapes = self.exchange_ints([*ndims, *(s for t in tensors for s in t.shape)])
        if any(f[: len(ndims)] != ndims for f in flat_shapes):
            raise ValueError(
                "The ranks disagree on the dims of the tensors to exchange: every rank must run "
                "the same model on losses with the same number of dims."
            )
        per_rank = [_split_shapes(flat[len(ndims) :], ndims) for flat in flat_shapes]
        maxima = [
            tuple(max(shapes[i][d] for shapes in per_rank) for d in range(tensor.ndim))
            for i, tensor in enumerate(tensors)
        ]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        pieces: list[list[Tensor]] = [[] for _ in tensors]
        for indices in by_dtype.values():
            padded = [_pad_to(tensors[i], maxima[i]).reshape(-1) for i in indices]
            flat = torch.cat(padded) if len(padded) > 1 else padded[0].contiguous()
            gathered = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(gathered, flat, group=self.group)
            self._count("all_gather", flat.numel() * flat.element_size() * (self.world_size - 1))
            for rank, buffer in enumerate(gathered):
                offset = 0
                for i in indices:
                    size = math.prod(maxima[i])
                    piece = buffer[offset : offset + size].reshape(maxima[i])
                    offset += size
                    pieces[i].append(piece.narrow(dims[i], 0, per_rank[rank][i][dims[i]]))
        return [torch.cat(parts, dim) for parts, dim in zip(pieces, dims, strict=True)]

    def all_reduce_sum(self, tensors: Sequence[Tensor], kind: str = "all_reduce") -> list[Tensor]:
        """The sum over ranks of each tensor, one all-reduce per dtype; checks failures.

        The failure flag rides in the first buffer. A rank that failed passes zeros of the same
        shapes; every rank then raises instead of returning. A sparse tensor (the ``.grad`` of an
        ``nn.Embedding(sparse=True)``) travels dense and comes back sparse.
        """
        if not tensors:
            tensors = [torch.zeros(0, device=self.device)]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        results: list[Tensor] = list(tensors)
        failures = 0.0
        for position, indices in enumerate(by_dtype.values()):
            parts = [_dense(tensors[i]).detach().reshape(-1) for i in indices]
            if position == 0:
                parts.append(parts[0].new_full((1,), self._flag()))
            flat = torch.cat(parts)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            r = self.world_size
            self._count(kind, flat.numel() * flat.element_size() * 2 * (r - 1) / r)
            if position == 0:
                failures = float(flat[-1])
            offset = 0
            for i in indices:
                size = tensors[i].numel()
                total = flat[offset : offset + size].reshape(tensors[i].shape)
                results[i] = (
                    total.to_sparse(tensors[i].sparse_dim()) if tensors[i].is_sparse else total
                )
                offset += size
        self._raise_if_any_failed(failures)
        return results


_OVERFLOW = 2


def from_first_rank(value: Tensor, rank: int) -> Tensor:
    """What rank ``rank`` contributes to an all-reduce that must return rank 0's ``value``.

    Adding zeros is exact, so a sum where only rank 0 contributes is a broadcast that can share
    its buffer (and its failure flag) with other all-reduced tensors.
    """
    return value.detach() if rank == 0 else torch.zeros_like(value)


def at_offset(value: Tensor, shape: tuple[int, ...], dim: int, offset: int) -> Tensor:
    """``value`` placed at ``offset`` along ``dim`` in zeros of ``shape``: summing every rank's
    placement over the ranks concatenates their values (an all-gather inside an all-reduce)."""
    placed = value.new_zeros(shape)
    placed.narrow(dim, offset, value.shape[dim]).copy_(value.detach())
    return placed


def _split_shapes(flat: list[int], ndims: Sequence[int]) -> list[tuple[int, ...]]:
    shapes, offset = [], 0
    for ndim in ndims:
        shapes.append(tuple(flat[offset : offset + ndim]))
        offset += ndim
    return shapes


def _pad_to(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``tensor`` zero-padded at the end of each dim to ``shape``."""
    if tuple(tensor.shape) == shape:
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return padded


def _dense(tensor: Tensor) -> Tensor:
    return tensor.to_dense() if tensor.is_sparse else tensor
