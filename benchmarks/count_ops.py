"""Counts the aten operations and host synchronisations of one call, on CPU tensors.

A :class:`torch.utils._python_dispatch.TorchDispatchMode` sees every operation that reaches the
dispatcher (views included); ``aten._local_scalar_dense`` is the one that copies a value to the host
(``bool(tensor)``, ``.item()``...), which on a GPU waits for every queued kernel, as do the operations
whose output size depends on the data (``nonzero``...); both are counted as syncs. A ``.tolist()`` or
``.cpu()`` of a CPU tensor reaches no operation, so code that must be counted reads with ``.item()``.
Counts depend only on the code path, not on the machine or its load.

    python benchmarks/count_ops.py                      # UPGradWeighting, default solver
    python benchmarks/count_ops.py --solvers auto active_set batched --sizes 16 128
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that make the host wait for the device: a copy of a value to the host, and the
# operations whose output size depends on the data (the host must learn it to allocate): a
# conversion to a sparse tensor (its number of entries), and indexing by a boolean mask
# (``t[mask]``, ``t[mask] = v``), which runs its ``nonzero`` inside the indexing kernel, out of the
# counter's sight: it is counted under MASK_INDEXING.
MASK_INDEXING = "index (boolean mask)"
SYNC_OPS = (
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique_dim",
    "_unique2",
    "_to_sparse",
    MASK_INDEXING,
)
_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operations by name; ``syncs`` is the number of host copies."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func.overloadpacket.__name__
        self.charge(name)
        if indexes_by_mask(name, args):
            self.charge(MASK_INDEXING)
        return func(*args, **(kwargs or {}))

    def charge(self, name: str) -> None:
        """Counts one operation ``name`` (a subclass may also file it elsewhere)."""
        self.counts[name] += 1

    @property
    def operations(self) -> int:
        return sum(self.counts.values()) - self.counts[MASK_INDEXING]

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in SYNC_OPS)


def indexes_by_mask(name: str, args: tuple[Any, ...]) -> bool:
    """Whether the operation ``name`` called with ``args`` indexes by a boolean (or uint8) mask."""
    if name not in _INDEXING or len(args) < 2:
        return False
    indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return any(
        isinstance(index, Tensor) and index.dtype in (torch.bool, torch.uint8) for index in indices
    )


def count(call: Callable[..., Any], *args: Any, **kwargs: Any) -> OpCounter:
    """Runs ``call(*args, **kwargs)`` once under an :class:`OpCounter` and returns the counter."""
    with OpCounter() as counter:
        call(*args, **kwargs)
    return counter


def make_jacobian(kind: str, size: int, seed: int = 0) -> Tensor:
    """A float64 ``[m, 2m]`` Jacobian: ``random``, ``low-rank`` (rank m/8) or ``near-duplicate``
    (rows drawn from m/2 + 1 base rows, plus 1e-3 noise)."""
    generator = torch.Generator().manual_seed(1000 * size + seed)
    columns = 2 * size
    if kind == "random":
        jacobian = torch.randn(size, columns, generator=generator, dtype=torch.float64)
    elif kind == "low-rank":
        rank = max(size // 8, 1)
        factor = torch.randn(size, rank, generator=generator, dtype=torch.float64)
        jacobian = factor @ torch.randn(rank, columns, generator=generator, dtype=torch.float64)
    elif kind == "near-duplicate":
        base = torch.randn(size // 2 + 1, columns, generator=generator, dtype=torch.float64)
        picks = torch.randint(0, base.shape[0], (size,), generator=generator)
        noise = torch.randn(size, columns, generator=generator, dtype=torch.float64)
        jacobian = base[picks] + 1e-3 * noise
    else:
        raise ValueError(f"kind must be random, low-rank or near-duplicate, got {kind!r}.")
    return jacobian


def gramian_of(jacobian: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    gramian = jacobian @ jacobian.T
    return ((gramian + gramian.T) / 2).to(dtype)


def make_gramian(kind: str, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The Gramian of :func:`make_jacobian`."""
    return gramian_of(make_jacobian(kind, size, seed), dtype)


def drifting_gramians(
    kind: str, size: int, steps: int, drift: float = 1e-3, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """Gramians of ``J_t = J_0 + drift * t * |J_0| E``, ``E`` a fixed random direction of unit
    entries: what consecutive steps of a training run look like."""
    jacobian = make_jacobian(kind, size)
    generator = torch.Generator().manual_seed(size)
    direction = torch.randn(jacobian.shape, generator=generator, dtype=torch.float64)
    direction = direction * jacobian.abs().mean()
    return [gramian_of(jacobian + drift * t * direction, dtype) for t in range(steps)]


def main() -> None:
    from jdoptim.aggregation import UPGradWeighting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--kinds", nargs="*", default=["random", "low-rank", "near-duplicate"])
    parser.add_argument("--solvers", nargs="*", default=["auto"])
    parser.add_argument("--steps", type=int, default=4, help="Gramians of the drifting sequence")
    args = parser.parse_args()
    print("Cold: a fresh UPGradWeighting per Gramian; warm: one instance along the sequence.")
    print("Each cell: the largest count over the sequence (warm: from its second Gramian on).")
    print()
    print("| Gramian | m | solver | ops (cold) | syncs (cold) | ops (warm) | syncs (warm) |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        for size in args.sizes:
            for solver in args.solvers:
                sequence = drifting_gramians(kind, size, args.steps)
                cold = [count(UPGradWeighting(solver=solver), g) for g in sequence]  # type: ignore[arg-type]
                weighting = UPGradWeighting(solver=solver)  # type: ignore[arg-type]
                weighting(sequence[0])
                warm = [count(weighting, gramian) for gramian in sequence[1:]]
                row = [
                    kind,
                    size,
                    solver,
                    max(c.operations for c in cold),
                    max(c.syncs for c in cold),
                    max(c.operations for c in warm),
                    max(c.syncs for c in warm),
                ]
                print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()
