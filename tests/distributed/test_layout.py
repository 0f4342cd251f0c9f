"""Step headers and the layout of every rank's losses in the global ones (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from jdoptim.autogram import Term, distinct_factors, instance_major_order
from jdoptim.autogram._terms import BiasTerm, OuterTerm, term_gramians
from jdoptim.distributed._gramian import _rebuild
from jdoptim.distributed._layout import StepKind, header, layout_of, shapes_of


def test_every_header_has_the_same_length() -> None:
    lengths = {len(header(StepKind.ENGINE, t)) for t in (None, torch.ones(()), torch.ones(3, 2))}
    assert len(lengths) == 1


def test_the_layout_concatenates_along_the_instance_dim() -> None:
    shapes = [(2, 3), (2, 5)]
    layout = layout_of(shapes, batch_dim=1, rank=1)
    assert layout is not None
    assert (layout.shape, layout.dim, layout.offset, layout.size) == ((2, 8), 1, 3, 5)
    placed = layout.place(torch.ones(2, 5))
    assert placed.shape == (2, 8) and float(placed[:, :3].abs().sum()) == 0
    order = instance_major_order(layout.shape, layout.dim)
    assert order.tolist()[:2] == [0, 8]  # instance-major rows: instance 0 of both tasks first


@pytest.mark.parametrize(
    ("shapes", "match"),
    [([(2, 3), (3, 3)], "outside the instance dim"), ([(3,), (3, 1)], "numbers of dims")],
)
def test_ranks_that_disagree_get_a_clear_error(shapes: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layout_of(shapes, batch_dim=1 if len(shapes[0]) == 2 else 0, rank=0)


def test_ranks_running_different_kinds_of_steps_are_told_so() -> None:
    headers = [header(StepKind.ENGINE, torch.ones(2)), header(StepKind.TASKS, torch.ones(2))]
    with pytest.raises(ValueError, match="different kinds of steps"):
        shapes_of(headers)
    assert shapes_of([header(StepKind.ENGINE, torch.ones(4, 2))] * 2) == [(4, 2), (4, 2)]


def test_a_factor_shared_by_two_terms_travels_once_and_is_shared_again() -> None:
    """A bias's term holds its weight's output gradients: they cross the ranks once, and the
    global terms share the gathered tensor, so the global Gramian folds the bias as a single
    process would."""
    a, b = torch.randn(1, 3, 1, 4), torch.randn(3, 1, 5)
    terms: list[Term] = [OuterTerm(a, b, (4, 5)), BiasTerm(a, (4,)), BiasTerm(a.clone(), (4,))]
    tensors, dims, slots = distinct_factors(terms)
    assert len(tensors) == 3 and tensors[0] is a and tensors[1] is b
    assert dims == [1, 0, 1] and slots == [0, 1, 0, 2]
    gathered = [torch.cat([t, t], dim=d) for t, d in zip(tensors, dims, strict=True)]
    rebuilt = _rebuild(terms, [gathered[slot] for slot in slots])  # as _gather_factors gives them
    assert rebuilt[1].a is rebuilt[0].a  # type: ignore[attr-defined]
    assert rebuilt[2].a is not rebuilt[0].a  # type: ignore[attr-defined]
    assert term_gramians(rebuilt)[1] is None
