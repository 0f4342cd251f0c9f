"""The collectives of a distributed Jacobian-descent step, with byte counts and shared failures.

Every collective of a step goes through one :class:`Communicator`, so that (1) the bytes each rank
sends per step are counted, per kind of collective, for the docs and benchmarks, and (2) no rank
can wait forever on a collective that another rank never reaches: local work runs inside
:meth:`Communicator.phase`, whose exit is itself a collective (an all-reduced error flag), so a rank
that raises makes every rank raise there, before anyone enters the next collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor


class DistributedStepError(RuntimeError):
    """Raised on every rank when some rank failed during a distributed step."""


class Communicator:
    """``torch.distributed`` collectives over one process group, counted in bytes sent per rank.

    Byte counts follow the usual ring algorithms: an all-gather or all-reduce of ``s`` bytes per
    rank sends about ``s · (R - 1)`` resp. ``2 s (R - 1) / R`` bytes from each rank; a broadcast
    of ``s`` bytes costs ``s`` (counted on every rank, as a tree would spread it).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent: dict[str, int] = {}
        # NCCL only moves CUDA tensors: the small control tensors live where the backend wants.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )

    def reset_counts(self) -> None:
        self.bytes_sent = {}

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + int(nbytes)

    # --- failures ------------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Runs local work; afterwards every rank learns whether any rank failed in it.

        On failure, the failing rank re-raises its own exception and every other rank raises
        :class:`DistributedStepError` naming the rank and its error, so no rank is left waiting.
        """
        error: BaseException | None = None
        try:
            yield
        except Exception as caught:  # every error must reach the agreement collective
            error = caught
        self.agree(name, error)

    def agree(self, name: str, error: BaseException | None) -> None:
        """All-reduces a failure flag; raises on every rank if any rank passed an error."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self._count("control", 2 * flag.element_size() * (self.world_size - 1) / self.world_size)
        if flag.item() == 0.0:
            return
        messages: list[str | None] = [None] * self.world_size
        own = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, own, group=self.group)
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        details = "; ".join(f"rank {rank}: {message}" for rank, message in failed)
        raise DistributedStepError(
            f"The distributed Jacobian-descent step failed on another rank during {name} "
            f"({details}). Every rank stops this step; parameters are unchanged."
        )

    # --- data ----------------------------------------------------------------------------------

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of ints (the same length on every rank)."""
        local = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        self._count("control", local.numel() * 8 * (self.world_size - 1))
        return [g.tolist() for g in gathered]

    def all_gather_padded(self, tensors: Sequence[Tensor], dims: Sequence[int]) -> list[Tensor]:
        """Concatenates each tensor over the ranks along its dim in ``dims``, rank 0 first.

        Ranks may hold different sizes along any dim: every tensor is zero-padded to the largest
        size first (one small all-gather of the shapes), the padding along the concatenation dim
        is cut off again, and padding along other dims stays, as zeros. Tensors of one dtype
        travel in one all-gather.
        """
        ndims = [t.ndim for t in tensors]
        # Sizes first (fixed length), so that ranks that disagree raise instead of mismatching.
        headers = self.all_gather_ints([len(ndims), sum(ndims)])
        flat_shapes = (
            self.all_gather_ints([*ndims, *(s for t in tensors for s in t.shape)])
            if all(h == headers[0] for h in headers)
            else []
        )
        if not flat_shapes or any(f[: len(ndims)] != ndims for f in flat_shapes):
            raise ValueError(
                "The ranks disagree on the number or the dims of the tensors to exchange: every "
                "rank must run the same model on losses with the same number of dims."
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

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The sum over ranks of each tensor (one all-reduce per dtype)."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_dtype.setdefault(tensor.dtype, []).append(index)
        results: list[Tensor] = list(tensors)
        for indices in by_dtype.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            r = self.world_size
            self._count("all_reduce", flat.numel() * flat.element_size() * 2 * (r - 1) / r)
            offset = 0
            for i in indices:
                size = tensors[i].numel()
                results[i] = flat[offset : offset + size].reshape(tensors[i].shape)
                offset += size
        return results

    def broadcast_from_first(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank (so that every rank applies bit-identical values)."""
        buffer = tensor.detach().clone().contiguous()
        dist.broadcast(buffer, src=dist.get_global_rank(self.group, 0), group=self.group)
        self._count("broadcast", buffer.numel() * buffer.element_size())
        return buffer


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
