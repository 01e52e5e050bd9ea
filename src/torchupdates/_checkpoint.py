"""Checkpoints: an optimizer's state dict, checked against its chain when loaded.

On top of torch's state dict: the chain's name under ``"rule"`` (a state dict saved from
another rule is refused with a message, not loaded into the wrong keys), state kept in a
wider ``state_dtype`` restored in that dtype, and 0-d tensor hyperparameters that keep their
identity (the loaded value is written into the tensor the user holds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._chain_keys import state_keys
from ._slots import work_dtype
from .engines import Stage

if TYPE_CHECKING:
    from .optimizer import Optimizer

__all__ = ["check_loaded_state", "load_state_dict", "state_dict"]


def state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """torch's state dict of ``optimizer`` plus ``"rule"``: its chain's name."""
    saved = torch.optim.Optimizer.state_dict(optimizer)
    saved["rule"] = optimizer.rule_name
    return saved


def load_state_dict(optimizer: Optimizer, saved: dict[str, Any]) -> None:
    """Load ``saved`` into ``optimizer`` for a bitwise-exact continuation (see the module notes).

    Raises
    ------
    ValueError
        When ``saved`` is not an optimizer state dict or does not fit the chain (see
        :func:`check_loaded_state`); nothing is loaded then.
    """
    stages: Sequence[Stage] = optimizer._stages
    check_loaded_state(saved, stages, optimizer.rule_name)
    held = [
        {key: value for key, value in group.items() if isinstance(value, Tensor) and key != "params"}
        for group in optimizer.param_groups
    ]
    torch.optim.Optimizer.load_state_dict(optimizer, saved)
    for group, tensors in zip(optimizer.param_groups, held, strict=True):
        for key, tensor in tensors.items():
            loaded = group.get(key)
            if isinstance(loaded, (Tensor, int, float)) and not isinstance(loaded, bool):
                with torch.no_grad():
                    tensor.copy_(torch.as_tensor(loaded, dtype=tensor.dtype))
                group[key] = tensor
    flat = [param for group in optimizer.param_groups for param in group["params"]]
    saved_ids = chain.from_iterable(group["params"] for group in saved["param_groups"])
    counters = {stage.step_key for stage in stages}
    for saved_id, param in zip(saved_ids, flat, strict=True):
        entries = saved["state"].get(saved_id)
        dtype = work_dtype(param, optimizer.state_dtype)
        if entries is None or dtype == param.dtype or param.is_complex():
            continue
        for key, value in entries.items():
            if isinstance(value, Tensor) and key not in counters:
                optimizer.state[param][key] = value.to(device=param.device, dtype=dtype, copy=True)


def check_loaded_state(saved: Mapping[str, Any], stages: Sequence[Stage], rule_name: str) -> None:
    """Raise a ``ValueError`` unless ``saved`` is a state dict of the chain ``stages``:
    the same rule name (when saved), every hyperparameter key in every group, and no state
    entry a parameter's stages do not keep."""
    if not isinstance(saved, Mapping) or "state" not in saved or "param_groups" not in saved:
        raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
    saved_rule = saved.get("rule", rule_name)
    if saved_rule != rule_name:
        raise ValueError(f"the state dict was saved from {saved_rule}, this optimizer is {rule_name}")
    for index, group in enumerate(saved["param_groups"]):
        missing = {key for stage in stages for key in stage.hyper_keys.values() if key not in group}
        if missing:
            raise ValueError(
                f"saved param group {index} lacks {sorted(missing)}, which {rule_name} needs: "
                "was it saved from another rule?"
            )
    saved_ids = chain.from_iterable(group["params"] for group in saved["param_groups"])
    for position, saved_id in enumerate(saved_ids):
        entries = saved["state"].get(saved_id)
        if not entries:
            continue
        expected = state_keys(stages, position)
        if not set(entries) <= expected:
            raise ValueError(
                f"the saved state of parameter {position} has entries {sorted(entries)}, "
                f"but {rule_name} keeps {sorted(expected)}: was it saved from another rule?"
            )
