"""The autogram engine: Gramians of Jacobians without the Jacobians (see ``docs/autogram.md``)."""

from jdoptim.autogram._engine import Engine

__all__ = ["Engine"]
