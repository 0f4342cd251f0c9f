"""Nothing the engine saves outlives its step: memory stays flat over many steps."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.autogram._records import METADATA_KEY


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))


def test_thousand_steps_keep_memory_flat() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GRU(8, 3, batch_first=True))
    engine = Engine(model[:2], batch_dim=0)
    gru = Engine(model[2], batch_dim=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(3, 2, 4)
    counts = []
    for step in range(1000):
        optimizer.zero_grad()
        output = model(x)[0].pow(2).sum(dim=(1, 2))
        engine.compute_gramian(output)
        engine.backward(torch.full((3,), 1 / 3))
        if step % 3 == 0:
            gru.compute_gramian(output)  # left pending: released by the next forward
        optimizer.step()
        if step in (12, 999):  # same phase of the every-third-step pattern
            counts.append(_live_tensors())
    assert counts[0] == counts[1]


def test_records_die_with_their_graph() -> None:
    model = nn.Linear(3, 2)
    Engine(model, batch_dim=0)
    output = model(torch.randn(4, 3))
    assert output.grad_fn is not None
    record = output.grad_fn.metadata[METADATA_KEY][0][0]
    alive = weakref.ref(record)
    del record, output
    gc.collect()
    assert alive() is None


def test_records_of_a_gramian_pass_die_with_their_graph() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.GRU(2, 2, batch_first=True))
    engine = Engine(model, batch_dim=0)
    output = model(torch.randn(4, 5, 3))[0].sum(dim=(1, 2))
    engine.compute_gramian(output)
    engine.backward(torch.ones(4))
    assert output.grad_fn is not None
    nodes = [output.grad_fn]
    refs = []
    while nodes:  # every record reachable from the output
        node = nodes.pop()
        refs += [weakref.ref(entry[0]) for entry in node.metadata.get(METADATA_KEY, [])]
        nodes += [child for child, _ in node.next_functions if child is not None]
    assert refs
    del output, nodes
    gc.collect()
    assert all(ref() is None for ref in refs)
