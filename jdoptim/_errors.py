"""Errors shared by the layers: raised low, recognised high (the optimizers reword them)."""

from __future__ import annotations


class NotDifferentiableError(ValueError):
    """Losses (outputs) that depend on none of the tensors they are differentiated with respect to:
    the engine's covered parameters, or autojac's inputs."""
