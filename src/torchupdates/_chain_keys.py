"""Where a chain keeps its values (each stage's keys in param groups and state) and its name.

A chain is one rule followed by modifiers, and every transform names its hyperparameters and
state locally (``momentum``, ``velocity``). In an optimizer's param groups and state those
names must not collide, so a stage gets the local name itself when it is free and the next
free ``name_2``, ``name_3``, ... otherwise: ``apply_momentum(momentum(...))`` keeps
``"momentum"`` and ``"momentum_2"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from .engines import Stage
from .transform import Transform

__all__ = ["ALIASES", "chain_name", "free_key", "make_stage", "positions_of", "state_keys"]

ALIASES = {"learning_rate": "lr"}
"""Local hyperparameter name -> its key in param groups (torch's schedulers use ``"lr"``)."""


def free_key(name: str, taken: Iterable[str]) -> str:
    """``name`` if it is not taken, else the first free ``name_2``, ``name_3``, ...

    Examples
    --------
    >>> free_key("momentum", ["lr", "momentum"])
    'momentum_2'
    """
    taken = set(taken)
    if name not in taken:
        return name
    suffix = 2
    while f"{name}_{suffix}" in taken:
        suffix += 1
    return f"{name}_{suffix}"


def make_stage(
    transform: Transform, taken_hyper: Iterable[str], taken_state: Iterable[str], members: frozenset[int] | None
) -> Stage:
    """The stage of ``transform`` in a chain whose groups and state already use some keys.

    Parameters
    ----------
    transform : Transform
        The rule or modifier.
    taken_hyper, taken_state : iterable of str
        Keys already used in param groups and in parameter state.
    members : frozenset of int or None
        Flat parameter positions the stage applies to (``None``: all).

    Returns
    -------
    Stage
        The transform with a free group key per hyperparameter (``learning_rate`` kept as
        ``lr``), a free state key per state entry and, when it counts steps, a free
        counter key (``"step"`` first).
    """
    taken_hyper, taken_state = set(taken_hyper), set(taken_state)
    hyper_keys: dict[str, str] = {}
    for spec in transform.hyperparameters:
        key = free_key(ALIASES.get(spec.name, spec.name), taken_hyper)
        hyper_keys[spec.name] = key
        taken_hyper.add(key)
    state_keys: dict[str, str] = {}
    for name in transform.state:
        key = free_key(name, taken_state)
        state_keys[name] = key
        taken_state.add(key)
    step_key = free_key("step", taken_state) if transform.counts_steps else None
    return Stage(transform, hyper_keys, state_keys, step_key, members)


def chain_name(stages: Sequence[Stage]) -> str:
    """The chain as a call expression, e.g. ``"apply_momentum(rmsprop, 2 params)"``."""
    name = stages[0].transform.name
    for stage in stages[1:]:
        subset = "" if stage.members is None else f", {len(stage.members)} params"
        name = f"{stage.transform.name}({name}{subset})"
    return name


def state_keys(stages: Sequence[Stage], position: int | None = None) -> set[str]:
    """Every state key (counters included) of the stages, or of those acting on ``position``."""
    return {
        key
        for stage in stages
        if position is None or stage.applies_to(position)
        for key in (*stage.state_keys.values(), stage.step_key)
        if key is not None
    }


def positions_of(param_groups: Sequence[Mapping[str, Any]], params: Iterable[Tensor], who: str) -> frozenset[int]:
    """The flat positions (over all groups, in order) of ``params``: a stage's members.

    Raises
    ------
    ValueError
        Naming ``who`` and the parameter's shape, for a tensor not in ``param_groups``.
    """
    if isinstance(params, Tensor):
        params = [params]
    flat = [param for group in param_groups for param in group["params"]]
    position_by_id = {id(param): position for position, param in enumerate(flat)}
    positions = set()
    for param in params:
        if id(param) not in position_by_id:
            shape = tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__
            raise ValueError(f"{who}: a parameter ({shape}) is not optimized by this optimizer")
        positions.add(position_by_id[id(param)])
    return frozenset(positions)
