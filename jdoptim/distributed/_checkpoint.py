"""``torch.distributed.checkpoint`` (DCP) for a jdoptim optimizer on a sharded model.

DCP's ``get_state_dict`` keeps torch's optimizer layout only (``state``, ``param_groups``, keyed
by parameter names), so the wrapped torch optimizer (``optimizer.optimizer``, which shares its
state with ``optimizer``) goes through DCP, sharded state and all, and jdoptim's own state
(``optimizer.jd_state_dict()``: the method's state and the step count, small and the same on
every rank) travels next to it as one serialised leaf, which DCP stores once.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_KEYS = ("model", "optimizer", "jdoptim")


def checkpoint_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """``{"model", "optimizer", "jdoptim"}`` for ``torch.distributed.checkpoint.save`` / ``load``.

    ``optimizer`` is a jdoptim optimizer (``JDSGD``, ``JDAdam``, ``JacobianDescent``...). To
    resume, pass the result for a freshly built model and optimizer to ``dcp.load``, then to
    :func:`load_checkpoint_state`.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
    buffer = io.BytesIO()
    torch.save(optimizer.jd_state_dict(), buffer)
    buffer.seek(0)
    return {"model": model_state, "optimizer": optimizer_state, "jdoptim": buffer}


def load_checkpoint_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Restores what :func:`checkpoint_state` saved, after ``dcp.load(state, ...)``."""
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(
            f"The checkpoint state lacks {missing}: build it with checkpoint_state(model, "
            "optimizer) for both dcp.save and dcp.load."
        )
    buffer = state["jdoptim"]
    buffer.seek(0)
    jd_state = torch.load(buffer, weights_only=True)
    set_state_dict(
        model,
        optimizer.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    optimizer.load_jd_state_dict(jd_state)
