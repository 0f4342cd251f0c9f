"""Operations and host reads of one ``compute_gramian`` call (deterministic: counted, not timed).

Counted on CPU tensors by ``benchmarks/count_gramian_ops.py``'s counter: every dispatched aten
operation, and every host read (``_local_scalar_dense``, ``tolist``, ``numpy``), each of which
waits for the queued kernels on a GPU. The bounds are the counts of this code; raising one needs a
reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.bench_autogram import Case
from benchmarks.count_gramian_ops import PhaseCounter
from jdoptim.autogram import Engine


def _count(model: nn.Module, x: torch.Tensor, loss: str = "squares") -> PhaseCounter:
    if loss == "squares":

        def losses() -> torch.Tensor:
            return model(x).pow(2).sum(dim=1)
    else:
        targets = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
        criterion = nn.CrossEntropyLoss(reduction="none")

        def losses() -> torch.Tensor:
            return criterion(model(x), targets)

    with Engine(model, batch_dim=0) as engine:
        engine.compute_gramian(losses())  # warm-up: first-call work is not what is counted
        output = losses()
        with PhaseCounter() as counter:
            engine.compute_gramian(output)
    return counter


def _mlp(hidden_layers: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def test_host_reads_per_call_do_not_grow_with_the_layers() -> None:
    """One read per call (the range of the factors), none per layer: the graph's structure proves
    the independence, so no probe verdict is read; the operations grow by a fixed number per
    layer."""
    x = torch.randn(4, 6)
    counts = {layers: _count(_mlp(layers), x) for layers in (1, 2, 4, 8)}
    assert {layers: c.syncs for layers, c in counts.items()} == {1: 1, 2: 1, 4: 1, 8: 1}
    per_layer = {
        (counts[b].operations - counts[a].operations) / (b - a) for a, b in ((1, 2), (2, 4), (4, 8))
    }
    assert len(per_layer) == 1
    # Linear + ReLU: backward, terms, Gramians, factor ranges, sum ...
    # 24 with the range of the output gradients read for the bias too, 29 with a product of its
    # own for each bias, 40 with the probe's rows and check, 56 before those were batched
    assert per_layer.pop() <= 22


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(("name", "bound"), [("mlp", 99), ("cnn", 151), ("transformer", 523)])
def test_counts_of_the_benchmark_models(name: str, bound: int) -> None:
    """``python -m benchmarks.count_gramian_ops`` at B = 32 (103, 157, 539 with the range of a
    factor shared by two terms read twice; 118, 167, 544 with a product of its own
    for each bias; 175, 236, 793 with the probe rows and
    two reads, the transformer 625 with its attention core replayed; 227, 305, 1079 before the
    probe rows were batched)."""
    model, x = Case(name, 32).build()
    counter = _count(model, x, loss="cross_entropy")
    assert counter.syncs == 1
    assert counter.operations <= bound
