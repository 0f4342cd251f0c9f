"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jdoptim.autogram import _batched
from jdoptim.autogram._structure import Proof

Proofs = list[Proof | None]


@pytest.fixture
def proofs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Proofs]:
    """What each Gramian pass's structural proof returned (``None``: not proven)."""
    seen: Proofs = []
    original = _batched.prove

    def recording(*args: object) -> Proof | None:
        result = original(*args)  # type: ignore[arg-type]
        seen.append(result)
        return result

    monkeypatch.setattr(_batched, "prove", recording)
    yield seen
