"""The optimizers' state-dict layout: torch's ``state`` and ``param_groups`` plus one jdoptim key.

Keeping torch's layout lets everything built on it work unchanged (``torch.distributed.checkpoint``,
FSDP's optimizer-state utilities, trainers' checkpointing). jdoptim's own state — the method's
state, its type, the step count and the ``GradScaler`` — travels under :data:`JD_STATE_KEY`.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

JD_STATE_KEY = "jdoptim"

_LEGACY_KEYS = {"optimizer", "method", "steps"}
# Options torch's Optimizer.__setstate__ adds to the defaults of any optimizer that loads a state
# dict, whether its groups use them or not: no evidence of another kind of optimizer.
_ADDED_ON_LOADING = {"differentiable"}


def split_legacy_state_dict(state_dict: Any) -> dict[str, Any]:
    """A state dict in the current layout; converts the earlier ``{"optimizer", "method", "steps"}``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
    if set(state_dict) >= _LEGACY_KEYS and "state" not in state_dict:
        inner = state_dict["optimizer"]
        jd_state = {"method": state_dict["method"], "steps": state_dict["steps"]}
        if "grad_scaler" in state_dict:
            jd_state["grad_scaler"] = state_dict["grad_scaler"]
        return {**inner, JD_STATE_KEY: jd_state}
    return state_dict


def jd_state_of(state_dict: dict[str, Any], owner: str) -> dict[str, Any]:
    """The jdoptim entry of ``state_dict``, checked; a clear error for a plain torch state dict."""
    jd_state = state_dict.get(JD_STATE_KEY)
    if not isinstance(jd_state, dict) or not {"method", "steps"} <= set(jd_state):
        raise ValueError(
            f"Not a {owner} state dict: the '{JD_STATE_KEY}' entry with the method's state is "
            "missing. A plain torch optimizer's state dict goes to the wrapped optimizer: "
            "optimizer.optimizer.load_state_dict(...)."
        )
    return jd_state


def check_method_type(jd_state: dict[str, Any], method_type: str) -> None:
    """Refuses the state of another method (it would load and fail later, or silently differ)."""
    saved = jd_state.get("method_type")
    if saved is not None and saved != method_type:
        raise ValueError(
            f"The state dict holds the state of {saved}, but this optimizer's method is "
            f"{method_type}; load a checkpoint saved with the same method, or only the wrapped "
            "optimizer's state (optimizer.optimizer.load_state_dict(...), without the 'jdoptim' "
            "entry)."
        )


def holds_nothing(method_state: dict[str, Any]) -> bool:
    """Whether a method's state dict carries no state: no tensors, and stateful parts that only
    name their class (``{"__method__": ...}``)."""
    return all(
        isinstance(value, dict) and set(value) <= {"__method__"} for value in method_state.values()
    )


def check_groups_match(inner: Optimizer, state_dict: dict[str, Any]) -> None:
    """Raises ``ValueError`` unless ``state_dict`` fits ``inner``'s groups (count, options, sizes)."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or "state" not in state_dict:
        raise ValueError(
            "Not an optimizer state dict: it needs 'state' and 'param_groups' (as saved by "
            "state_dict())."
        )
    if len(groups) != len(inner.param_groups):
        raise ValueError(
            f"The state dict has {len(groups)} parameter groups, this optimizer "
            f"{len(inner.param_groups)}."
        )
    for index, (saved, group) in enumerate(zip(groups, _as_loaded(inner, groups), strict=True)):
        missing = sorted(set(inner.defaults) - set(saved) - set(group) - _ADDED_ON_LOADING)
        if missing:
            raise ValueError(
                f"param_groups[{index}] of the state dict lacks {missing}: it was saved by "
                f"another kind of optimizer than {type(inner).__name__}."
            )
        expected = len(inner.param_groups[index]["params"])
        if len(saved.get("params", [])) != expected:
            raise ValueError(
                f"param_groups[{index}] of the state dict has {len(saved.get('params', []))} "
                f"parameters, this optimizer's {expected}."
            )


def _as_loaded(inner: Optimizer, groups: list[Any]) -> list[dict[str, Any]]:
    """The saved groups as ``inner``'s own ``__setstate__`` completes them on loading (torch's
    optimizers fill the options added by later versions, e.g. Adam's ``decoupled_weight_decay``),
    computed on a copy: a checkpoint of an older torch loads as it does into ``inner`` itself."""
    # A shallow copy with its own defaults, built without copy.copy: that runs __setstate__, and
    # torch's fills the defaults in place (setdefault("differentiable")), which on inner's own
    # would make every later checkpoint of an optimizer without that option look foreign.
    probe = object.__new__(type(inner))
    probe.__dict__.update(inner.__dict__)
    probe.defaults = dict(inner.defaults)
    try:
        type(inner).__setstate__(
            probe, {"state": {}, "param_groups": [dict(group) for group in groups]}
        )
    except Exception:  # an optimizer whose __setstate__ needs more: judge the groups as saved
        return [dict(group) for group in groups]
    return [dict(group) for group in probe.param_groups]
