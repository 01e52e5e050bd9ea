"""Checkpoints: an optimizer's state dict, checked against its chain when loaded.

On top of torch's state dict: the chain's name under ``"rule"`` (a state dict saved from
another rule is refused with a message, not loaded into the wrong keys), the optimizer's
``state_dtype`` under ``"state_dtype"`` (a dtype name such as ``"float32"``, or ``None``),
the number of steps ``skip_nonfinite`` skipped under ``"skipped_steps"``, state kept in a
wider ``state_dtype`` restored in that dtype, and 0-d tensor hyperparameters that keep their
identity (the loaded value is written into the tensor the user holds).

Everything is checked before anything is loaded, so a state dict that does not fit raises
and leaves the optimizer as it was: the groups (their number and sizes, every hyperparameter
key and value; keys the chain does not have when the state dict does not come from this
chain, e.g. ``torch.optim.SGD``'s ``weight_decay``) and every state entry (no unknown key,
each stage's entries all there or all absent, a tensor of the parameter's shape and kind, a
0-d integer step counter). Loading never lowers the precision of saved state: state saved
in a wider dtype than this optimizer keeps (a ``state_dtype=torch.float32`` checkpoint of
bfloat16 parameters loaded into an optimizer built without ``state_dtype``) is an error
that says which ``state_dtype`` to build it with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._chain_keys import state_keys
from ._groups import BETAS, SCHEDULER_KEYS, betas_keys
from ._slots import work_dtype
from .engines import Stage
from .transform import check_hyperparameter, check_hyperparameter_device

if TYPE_CHECKING:
    from .optimizer import Optimizer

__all__ = ["SKIPPED_STEPS", "STATE_DTYPE", "check_loaded_state", "load_state_dict", "state_dict"]

STATE_DTYPE = "state_dtype"
"""The state dict's key for the optimizer's ``state_dtype``: a dtype name or ``None``."""

SKIPPED_STEPS = "skipped_steps"
"""The state dict's key for :attr:`Optimizer.skipped_steps` (absent: 0)."""


def state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """torch's state dict of ``optimizer`` plus ``"rule"`` (its chain's name),
    ``"state_dtype"`` (``"float32"``, ..., or ``None``) and ``"skipped_steps"``."""
    saved = torch.optim.Optimizer.state_dict(optimizer)
    saved["rule"] = optimizer.rule_name
    state_dtype = optimizer.state_dtype
    saved[STATE_DTYPE] = None if state_dtype is None else str(state_dtype).removeprefix("torch.")
    saved[SKIPPED_STEPS] = optimizer.skipped_steps
    return saved


def load_state_dict(optimizer: Optimizer, saved: dict[str, Any]) -> None:
    """Load ``saved`` into ``optimizer`` for a bitwise-exact continuation (see the module notes).

    Raises
    ------
    ValueError, TypeError
        When ``saved`` is not an optimizer state dict or does not fit the optimizer (see
        :func:`check_loaded_state`); nothing is loaded then.
    """
    stages: Sequence[Stage] = optimizer._stages
    check_loaded_state(saved, optimizer)
    held = [
        {key: value for key, value in group.items() if isinstance(value, Tensor) and key != "params"}
        for group in optimizer.param_groups
    ]
    torch.optim.Optimizer.load_state_dict(optimizer, saved)
    optimizer.skipped_steps = saved.get(SKIPPED_STEPS, 0)
    for group, tensors in zip(optimizer.param_groups, held, strict=True):
        for key, tensor in tensors.items():
            loaded = group.get(key)
            if isinstance(loaded, (Tensor, int, float)) and not isinstance(loaded, bool):
                with torch.no_grad():
                    tensor.copy_(torch.as_tensor(loaded, dtype=tensor.dtype))
                group[key] = tensor
    flat = [param for group in optimizer.param_groups for param in group["params"]]
    saved_ids = chain.from_iterable(group["params"] for group in saved["param_groups"])
    counters = {stage.step_key for stage in stages if stage.step_key is not None}
    for saved_id, param in zip(saved_ids, flat, strict=True):
        entries = saved["state"].get(saved_id)
        if not entries:
            continue
        state = optimizer.state[param]
        for key in counters & set(state):
            counter = state[key]
            if counter.dtype != torch.int64 or counter.device.type != "cpu":
                state[key] = counter.to(device="cpu", dtype=torch.int64)
        dtype = work_dtype(param, optimizer.state_dtype)
        if dtype == param.dtype or param.is_complex():
            continue
        for key, value in entries.items():
            if isinstance(value, Tensor) and key not in counters:
                state[key] = value.to(device=param.device, dtype=dtype, copy=True)


def check_loaded_state(saved: Mapping[str, Any], optimizer: Optimizer) -> None:
    """Raise a ``ValueError`` (a ``TypeError`` for values of a wrong type) unless ``saved`` is
    a state dict that fits ``optimizer``: see the module notes for everything checked."""
    stages: Sequence[Stage] = optimizer._stages
    rule_name = optimizer.rule_name
    groups = optimizer.param_groups
    if (
        not isinstance(saved, Mapping)
        or not isinstance(saved.get("state"), Mapping)
        or not isinstance(saved.get("param_groups"), (list, tuple))
    ):
        raise ValueError("not an optimizer state dict: it needs 'state' (a dict) and 'param_groups' (a list)")
    skipped = saved.get(SKIPPED_STEPS, 0)
    if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
        raise ValueError(f"the state dict's {SKIPPED_STEPS!r} must be an int >= 0, got {skipped!r}")
    saved_rule = saved.get("rule")
    if saved_rule is not None and saved_rule != rule_name:
        raise ValueError(f"the state dict was saved from {saved_rule}, this optimizer is {rule_name}")
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
    for index, (group, current) in enumerate(zip(saved_groups, groups, strict=True)):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(f"saved param group {index} is not a dict with a 'params' list")
        if len(group["params"]) != len(current["params"]):
            raise ValueError(
                f"saved param group {index} has {len(group['params'])} parameters, "
                f"this optimizer's has {len(current['params'])}"
            )
        _check_group(group, index, current, stages, rule_name, strict=saved_rule is None)
    saved_ids = [saved_id for group in saved_groups for saved_id in group["params"]]
    try:
        distinct = set(saved_ids)
        orphans = [key for key in saved["state"] if key not in distinct]
    except TypeError:
        raise ValueError("the state dict's parameter ids must be hashable") from None
    if len(distinct) != len(saved_ids):
        raise ValueError("the state dict lists a parameter id in more than one place")
    if orphans:
        raise ValueError(f"the state dict has state for parameter ids {orphans[:5]} that no param group lists")
    flat = [param for group in groups for param in group["params"]]
    saved_dtype = saved.get(STATE_DTYPE)
    for position, (saved_id, param) in enumerate(zip(saved_ids, flat, strict=True)):
        entries = saved["state"].get(saved_id)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise TypeError(f"the saved state of parameter {position} must be a dict, got {type(entries).__name__}")
        if entries:
            _check_entries(entries, position, param, stages, rule_name, optimizer.state_dtype, saved_dtype)


def _check_group(
    group: Mapping[str, Any],
    index: int,
    current: Mapping[str, Any],
    stages: Sequence[Stage],
    rule_name: str,
    strict: bool,
) -> None:
    """Every hyperparameter key there with a valid value; with ``strict`` (a state dict
    that does not say it comes from this chain), no key the chain does not know."""
    chain_keys = {key for stage in stages for key in stage.hyper_keys.values()}
    missing = chain_keys - set(group)
    if missing:
        raise ValueError(
            f"saved param group {index} lacks {sorted(missing)}, which {rule_name} needs: "
            "was it saved from another rule?"
        )
    if strict:
        known = chain_keys | {"params", "param_names"} | SCHEDULER_KEYS | set(current)
        if betas_keys(stages) is not None:
            known.add(BETAS)
        unknown = set(group) - known
        if unknown:
            raise ValueError(
                f"saved param group {index} has {sorted(unknown, key=str)}, which {rule_name} does not have: "
                "was it saved from another rule or optimizer?"
            )
    where = f"saved param group {index} of {rule_name}"
    for stage in stages:
        for spec in stage.transform.hyperparameters:
            value = group[stage.hyper_keys[spec.name]]
            check_hyperparameter(where, spec, value)
            check_hyperparameter_device(where, spec.name, value, current["params"])


def _check_entries(
    entries: Mapping[str, Any],
    position: int,
    param: Tensor,
    stages: Sequence[Stage],
    rule_name: str,
    state_dtype: torch.dtype | None,
    saved_dtype: object,
) -> None:
    """One parameter's saved state: the keys its stages keep (each stage's all or none),
    step counters as 0-d integer tensors, other entries as tensors that can be cast to the
    parameter's state without losing precision."""
    where = f"the saved state of parameter {position}"
    expected = state_keys(stages, position)
    if not set(entries) <= expected:
        raise ValueError(
            f"{where} has entries {sorted(entries, key=str)}, "
            f"but {rule_name} keeps {sorted(expected)}: was it saved from another rule?"
        )
    for stage in stages:
        if not stage.applies_to(position):
            continue
        keys = {*stage.state_keys.values(), *([stage.step_key] if stage.step_key is not None else [])}
        missing = keys - set(entries)
        if missing and missing != keys:
            raise ValueError(
                f"{where} lacks {sorted(missing)} beside {sorted(keys & set(entries))}: "
                f"{rule_name} would restart it from zero; was it saved from another rule?"
            )
    counters = {stage.step_key for stage in stages if stage.step_key is not None}
    kept = _kept_dtype(param, state_dtype)
    for key, value in entries.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
        if value.layout != torch.strided or value.device.type == "meta":
            raise ValueError(f"{where}: {key!r} holds no dense values ({value.layout} on {value.device})")
        if key in counters:
            if value.dim() != 0 or value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(
                    f"{where}: the step counter {key!r} must be a 0-d integer tensor, "
                    f"got {tuple(value.shape)} {value.dtype}"
                )
            if int(value) < 0:
                raise ValueError(f"{where}: the step counter {key!r} is negative ({int(value)})")
            continue
        if value.shape != param.shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, the parameter {tuple(param.shape)}")
        if value.is_complex() != param.is_complex() or not (value.is_floating_point() or value.is_complex()):
            raise TypeError(
                f"{where}: {key!r} has dtype {value.dtype}, which cannot hold the state of a {param.dtype} parameter"
            )
        if value.dtype.itemsize > kept.itemsize:
            saved_as = "" if saved_dtype is None else f" (it was saved with state_dtype={saved_dtype})"
            raise ValueError(
                f"{where}: {key!r} is {value.dtype}{saved_as}, but this optimizer keeps it in {kept}, "
                f"which would lose precision: build the optimizer with state_dtype={value.dtype}"
            )


def _kept_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``param``'s state in an optimizer with ``state_dtype`` (as ``init_state``)."""
    if param.is_complex():
        return param.dtype
    return work_dtype(param, state_dtype)
