"""Counts the aten operations and host reads of the Gramian pass, per phase and layer type (CPU).

Like ``count_ops.py`` (whose :class:`OpCounter` this extends), a ``TorchDispatchMode`` sees every
operation that reaches the dispatcher, views included. Host reads are the dispatched
``aten._local_scalar_dense`` (``bool(t)``, ``.item()``) plus ``Tensor.tolist()`` and
``Tensor.numpy()``, which read CPU memory without dispatching (seen by a ``TorchFunctionMode``); on
a GPU each of them waits for every queued kernel. Counts depend only on the code path, not on the
machine or its load.

Each operation is charged to the innermost labelled phase running when it is dispatched:
``backward`` (the batched backward pass of activation gradients, with the independence probe
rows), ``check`` (the probe's verdicts), ``terms: <layer>`` (a layer's closed form: unfolding,
normalising, the attention core), ``gramian: <layer>`` (that layer's term Gramians), ``assembly``
(the sum of the terms' Gramians and its layout; for a step also the scale), ``.grad: <layer>`` (the
fused gradient), ``weighting`` and, for ``compute_gramian`` alone, ``other`` (the rest).

    python -m benchmarks.count_gramian_ops                 # compute_gramian, B = 32
    python -m benchmarks.count_gramian_ops --step          # + one JDSGD(UPGradWeighting) step
    python -m benchmarks.count_gramian_ops --models mlp --batch 128
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from benchmarks.bench_autogram import Case
from benchmarks.count_ops import MASK_INDEXING, SYNC_OPS, OpCounter

HOST_READS = ("tolist", "numpy")

_labels: list[str] = []


@contextmanager
def phase(label: str) -> Iterator[None]:
    """Charges the operations dispatched inside to ``label`` (the innermost label wins)."""
    _labels.append(label)
    try:
        yield
    finally:
        _labels.pop()


class PhaseCounter(OpCounter):  # type: ignore[no-untyped-call]
    """An :class:`OpCounter` that also counts per phase, and host reads that do not dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.by_phase: dict[str, Counter[str]] = {}
        self._reads = _HostReads(self)

    def charge(self, name: str) -> None:
        super().charge(name)
        label = _labels[-1] if _labels else "other"
        self.by_phase.setdefault(label, Counter())[name] += 1

    def __enter__(self) -> PhaseCounter:
        self._reads.__enter__()  # type: ignore[no-untyped-call]
        super().__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]
        self._reads.__exit__(*exc)  # type: ignore[no-untyped-call]

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in (*SYNC_OPS, *HOST_READS))

    def phase_totals(self) -> dict[str, tuple[int, int]]:
        """``{phase: (operations, host reads)}``."""
        return {
            label: (
                sum(counts.values()) - counts[MASK_INDEXING],
                sum(counts[name] for name in (*SYNC_OPS, *HOST_READS)),
            )
            for label, counts in self.by_phase.items()
        }


class _HostReads(TorchFunctionMode):
    def __init__(self, counter: PhaseCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], Tensor):
            self.counter.charge(name)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------- labelling the code

_term_owner: dict[int, str] = {}  # id(term) -> layer type, for the terms of the current pass


def _wrap(owner: Any, name: str, label: Callable[..., str]) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with phase(label(*args, **kwargs)):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def _tagging(owner: Any, name: str, layer_of: Callable[..., str]) -> None:
    """Wraps a function returning ``{name: term}`` or ``None``: labels it, remembers the layers."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        layer = layer_of(*args, **kwargs)
        with phase(f"terms: {layer}"):
            terms = original(*args, **kwargs)
        for term in (terms or {}).values():
            _term_owner[id(term)] = layer
        return terms

    setattr(owner, name, wrapped)


def install_labels() -> None:
    """Labels the phases of the Gramian pass and step (once per process)."""
    if getattr(install_labels, "done", False):
        return
    install_labels.done = True  # type: ignore[attr-defined]
    import jdoptim.autogram._batched as batched
    import jdoptim.autogram._engine as engine
    import jdoptim.autogram._terms as terms
    from jdoptim.autogram._rules import CLOSED_FORMS

    _wrap(batched.BatchedPass, "_activation_gradients", lambda *a, **k: "backward")
    _wrap(batched, "scaled_dims", lambda *a, **k: "check")
    _wrap(batched, "masked_dims", lambda *a, **k: "check")
    for rule in {id(r): r for r in CLOSED_FORMS.values()}.values():
        _tagging(type(rule), "terms", lambda self, module, *a, **k: type(module).__name__)
    _tagging(batched, "attention_terms", lambda *a, **k: "MultiheadAttention")
    for cls in (terms.MaterializedTerm, terms.OuterTerm, terms.EmbeddingTerm, terms.BiasTerm):
        _wrap(cls, "gramian", lambda self, **k: f"gramian: {_term_owner.get(id(self), 'other')}")
        _wrap(cls, "weighted_grad", lambda self, w: f".grad: {_term_owner.get(id(self), 'other')}")
    import jdoptim.paths._gramian as gramian_path

    for module in (engine, gramian_path):
        # The names each module imported (jdoptim before scaled_gramian_from_terms had none).
        for name in ("gramian_from_terms", "scaled_gramian_from_terms", "jacobian_scale"):
            if hasattr(module, name):
                _wrap(module, name, lambda *a, **k: "assembly")
    _wrap(gramian_path, "weights_for", lambda *a, **k: "weighting")


# ---------------------------------------------------------------------------- what is counted


def _losses(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    targets = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    criterion = nn.CrossEntropyLoss(reduction="none")
    return lambda: criterion(model(x), targets)


def count_compute_gramian(model: nn.Module, x: Tensor) -> PhaseCounter:
    """One ``Engine(model, batch_dim=0).compute_gramian`` call (after a warm-up call)."""
    from jdoptim.autogram import Engine

    install_labels()
    losses = _losses(model, x)
    with Engine(model, batch_dim=0) as engine:
        engine.compute_gramian(losses())
        output = losses()
        _term_owner.clear()
        with PhaseCounter() as counter:
            engine.compute_gramian(output)
    return counter


def count_step(model: nn.Module, x: Tensor) -> PhaseCounter:
    """One ``JDSGD(UPGradWeighting(), batch_dim=0).step(closure)`` (after two warm-up steps)."""
    from jdoptim import JDSGD
    from jdoptim.aggregation import UPGradWeighting

    install_labels()
    losses = _losses(model, x)
    optimizer = JDSGD(model.parameters(), lr=1e-4, weighting=UPGradWeighting(), batch_dim=0)

    def closure() -> Tensor:
        with phase("forward"):
            return losses()

    optimizer.step(closure)
    optimizer.step(closure)
    _term_owner.clear()
    with PhaseCounter() as counter:
        optimizer.step(closure)
    return counter


MODELS = ("mlp", "cnn", "transformer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--step", action="store_true", help="also count one JDSGD(UPGrad) step")
    args = parser.parse_args()
    runs: list[tuple[str, Callable[[nn.Module, Tensor], PhaseCounter]]] = [
        ("compute_gramian", count_compute_gramian)
    ]
    if args.step:
        runs.append(("JDSGD(UPGradWeighting) step", count_step))
    for what, run in runs:
        print(f"\n{what}, B = {args.batch}: operations / host reads, per phase\n")
        results = {}
        for name in args.models:
            model, x = Case(name, args.batch).build()
            results[name] = run(model, x)
        phases = sorted({label for c in results.values() for label in c.by_phase})
        print("| phase | " + " | ".join(results) + " |")
        print("|---" * (len(results) + 1) + "|")
        for label in phases:
            cells = []
            for counter in results.values():
                ops, reads = counter.phase_totals().get(label, (0, 0))
                cells.append(f"{ops} / {reads}" if ops else "")
            print(f"| {label} | " + " | ".join(cells) + " |")
        totals = [f"**{c.operations} / {c.syncs}**" for c in results.values()]
        print("| **total** | " + " | ".join(totals) + " |", flush=True)


if __name__ == "__main__":
    main()
