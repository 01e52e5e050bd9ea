"""Param groups: plain dicts of parameters and hyperparameters, checked, with torch's ``"betas"``.

torch.optim keeps Adam's decay rates as one ``group["betas"]`` pair, and the schedulers that
cycle momentum (``OneCycleLR``, ``CyclicLR``) read ``optimizer.defaults`` for that key and
write ``group["betas"] = (m, *group["betas"][1:])``. The rules here name the rates
``beta1`` and ``beta2``, so a group of a rule that has both keeps three keys: ``"beta1"``,
``"beta2"`` and a real ``"betas"`` tuple of the same two values. The optimizer reconciles
them before each step (:class:`BetasLink`), remembering the pair it saw last: the side
that changed since then wins, and both sides changing to different values is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ._chain_keys import ALIASES
from .engines import Stage
from .grads import check_leaf, describe
from .transform import check_hyperparameter, check_hyperparameter_device

__all__ = [
    "BETAS",
    "MODIFIER_KEY",
    "SCHEDULER_KEYS",
    "BetasLink",
    "betas_keys",
    "check_group",
    "check_param",
    "check_params",
    "new_group",
    "stage_values",
    "unknown_keys",
    "unknown_keys_error",
]

BETAS = "betas"
"""torch's key for the pair ``(beta1, beta2)``."""

SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"})
"""Keys torch's schedulers (``torch.optim.lr_scheduler``, ``swa_utils.SWALR``) keep in param
groups: allowed in a group given to an optimizer (one resumed for a scheduler has
``"initial_lr"``) and in a loaded state dict."""

_TORCH_KEYS = frozenset({"params", "param_names", *SCHEDULER_KEYS})

MODIFIER_KEY = re.compile(r"momentum(_\d+)?")
"""Group keys of the modifiers' hyperparameter (``apply_momentum``'s ``"momentum"``, and
``"momentum_2"``, ... when stacked). A group given to ``momentum()`` or ``nesterov_momentum()``
holds one for the modifier they compose at once (they build ``sgd``, then compose
``apply_momentum``); given to any other rule, such a key is an error like any unknown key."""

Pair = tuple[Any, Any]


def betas_keys(stages: Sequence[Stage]) -> tuple[str, str] | None:
    """The group keys of the rule's ``beta1`` and ``beta2``, when it has both (else ``None``)."""
    keys = stages[0].hyper_keys
    if "beta1" in keys and "beta2" in keys:
        return keys["beta1"], keys["beta2"]
    return None


def new_group(
    param_group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    offset: int,
    betas: tuple[str, str] | None,
    *,
    index: int = 0,
    owner: str = "this optimizer",
    taken: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """A new param group: a checked copy of ``param_group`` completed from ``defaults``.

    Parameters
    ----------
    param_group : dict
        ``"params"`` (a tensor or an ordered collection of tensors, or of ``(name, tensor)``
        pairs as ``named_parameters()`` gives them) and overrides.
    defaults : dict
        The optimizer's defaults, for every key not given.
    offset : int
        The flat position of the group's first parameter (for error messages).
    betas : pair of str or None
        The group keys of ``beta1`` and ``beta2`` (see :func:`betas_keys`).
    index : int
        The group's index, for error messages.
    owner : str
        The chain's name, for error messages.
    taken : mapping of int to int, optional
        ``id(tensor) -> flat position`` of the parameters already in other groups.

    Returns
    -------
    dict
        ``"learning_rate"`` is stored as ``"lr"``. With ``betas``, a ``"betas"`` given
        sets ``beta1`` and ``beta2``, and ``"betas"`` is always their pair. Named
        parameters are split as torch 2.13 does: tensors in ``"params"``, names in
        ``"param_names"``. Keys the chain does not have are kept: the caller decides
        (see :func:`unknown_keys`).

    Raises
    ------
    TypeError, ValueError
        For parameters that are not leaf floating-point tensors, given in a set, or listed
        twice (here or in ``taken``); for some parameters named and others not; for a key
        given under both its names; for ``"betas"`` that is no pair
        or contradicts a ``beta1``/``beta2`` given beside it.
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    given = set(group)
    params = group.get("params")
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise TypeError(
            f"param group {index}: parameters must be given in an ordered collection (a list), "
            f"not a {type(params).__name__}, whose order may change between runs"
        )
    elif params is None:
        raise ValueError(f"param group {index} needs a 'params' entry")
    elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
        kind = type(params).__name__
        raise TypeError(f"param group {index}: 'params' must be a tensor or a list of tensors, got {kind}")
    group["params"], names = _split_names(list(params), offset)
    if names is not None:
        if "param_names" in group and list(group["param_names"]) != names:
            raise ValueError(f"param group {index} gives named parameters and a different 'param_names'")
        group["param_names"] = names
    seen = dict(taken) if taken is not None else {}
    for position, param in enumerate(group["params"], offset):
        check_param(position, param)
        earlier = seen.setdefault(id(param), position)
        if earlier != position:
            raise ValueError(_twice(position, earlier, param))
    for alias, key in ALIASES.items():
        if alias in group:
            value = group.pop(alias)
            if key in group:
                raise ValueError(f"param group gives both {alias!r} and {key!r}; give one")
            group[key] = value
            given.add(key)
    for key, value in defaults.items():
        group.setdefault(key, value)
    if betas is not None and BETAS in given:
        pair = _as_pair(group[BETAS], "param group")
        for key, value in zip(betas, pair, strict=True):
            if key in given and not _same(group[key], value):
                raise ValueError(f"param group gives betas={pair!r} and {key}={group[key]!r}; give one")
            group[key] = value
    if betas is not None:
        group[BETAS] = (group[betas[0]], group[betas[1]])
    return group


def unknown_keys(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> frozenset[str]:
    """The keys of ``group`` that are neither the chain's (``defaults``, ``"learning_rate"``)
    nor torch's (``"params"``, ``"param_names"``, the schedulers' :data:`SCHEDULER_KEYS`)."""
    return frozenset(key for key in group if key not in defaults and key not in _TORCH_KEYS)


def unknown_keys_error(index: int, keys: Iterable[str], defaults: Mapping[str, Any], owner: str) -> ValueError:
    """The error for a param group given keys the chain does not have (a misspelling, or a
    hyperparameter of another rule: ``weight_decay``, ``betas`` on ``sgd``)."""
    valid = sorted({*defaults, *ALIASES})
    hint = ""
    if any(isinstance(key, str) and MODIFIER_KEY.fullmatch(key) for key in keys):
        hint = "; a modifier's momentum goes into the groups of the optimizer that apply_momentum returns"
    return ValueError(
        f"param group {index} has unknown key(s) {sorted(keys, key=str)}: {owner} takes {valid} "
        f"(and 'params', 'param_names' and the schedulers' {sorted(SCHEDULER_KEYS)}){hint}"
    )


def check_group(
    group: Mapping[str, Any], index: int, stages: Sequence[Stage], owner: str, traced: bool = False
) -> None:
    """Raise a clear error unless every hyperparameter of the chain in ``group`` is valid.

    In a step ``traced`` by ``torch.compile`` a 0-d tensor's value is not read (that would
    sync with its device and break the graph; torch.optim does not check either): its
    shape, dtype and ``requires_grad`` still are, and Python numbers are checked as always.
    """
    for alias, key in ALIASES.items():
        if alias in group:
            raise ValueError(f"param group {index} has {alias!r}, which is kept as {key!r}: set group[{key!r}]")
    where = f"{owner}, param group {index}"
    for stage in stages:
        for spec in stage.transform.hyperparameters:
            value = group[stage.hyper_keys[spec.name]]
            check_hyperparameter(where, spec, value, read_tensors=not traced)
            if isinstance(value, Tensor):
                check_hyperparameter_device(where, spec.name, value, group["params"])


def check_params(param_groups: Sequence[Mapping[str, Any]]) -> None:
    """Raise a clear error unless every entry of every group's ``"params"`` is a leaf
    floating-point or complex tensor listed once (in all groups together): for lists edited
    after the optimizer was built. The message names the parameter's flat position."""
    first: dict[int, int] = {}
    position = 0
    for group in param_groups:
        for param in group["params"]:
            check_param(position, param)
            earlier = first.setdefault(id(param), position)
            if earlier != position:
                raise ValueError(_twice(position, earlier, param))
            position += 1


def check_param(position: int, param: object) -> None:
    """Raise unless ``param`` is a leaf floating-point or complex tensor."""
    check_leaf(position, param)
    assert isinstance(param, Tensor)
    if not (param.is_floating_point() or param.is_complex()):
        raise TypeError(f"{describe(position, param)} must be floating point or complex to be optimized")


def _twice(position: int, earlier: int, param: Tensor) -> str:
    return (
        f"{describe(position, param)} is parameter {earlier} again: list each parameter once "
        "(a tensor listed twice, in one group or in more than one, would be updated twice per step)"
    )


def _split_names(entries: list[Any], offset: int) -> tuple[list[Any], list[Any] | None]:
    """``(tensors, names)`` of a params list that may hold ``(name, tensor)`` pairs (names
    ``None`` when it holds none); some named and some not is a ``ValueError``."""
    named = [isinstance(entry, tuple) for entry in entries]
    if not any(named):
        return entries, None
    if not all(named):
        position = offset + named.index(False)
        raise ValueError(
            f"parameter {position} has no name but others do: give all parameters as (name, tensor) pairs or none"
        )
    for position, entry in enumerate(entries, offset):
        if len(entry) != 2:
            raise TypeError(f"parameter {position}: a named parameter is a (name, tensor) pair, got {len(entry)} items")
    return [tensor for _, tensor in entries], [name for name, _ in entries]


class BetasLink:
    """torch's ``"betas"`` kept equal to ``beta1``/``beta2`` in one optimizer's groups.

    Without both keys in the rule (every rule but the Adam family) it does nothing.

    Attributes
    ----------
    keys : pair of str or None
        The group keys of ``beta1`` and ``beta2`` (see :func:`betas_keys`).
    seen : list of pair
        Group ``i``'s ``(beta1, beta2)`` when it was added, loaded or last reconciled.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.keys = betas_keys(stages)
        self.seen: list[Pair] = []

    def link(self, group: dict[str, Any]) -> None:
        """Set ``group["betas"]`` to its ``(beta1, beta2)`` (defaults, new groups)."""
        if self.keys is not None:
            group[BETAS] = (group[self.keys[0]], group[self.keys[1]])

    def added(self, group: Mapping[str, Any]) -> None:
        """Remember a group just appended to the optimizer's groups."""
        if self.keys is not None:
            self.seen.append(group[BETAS])

    def loaded(self, groups: Sequence[dict[str, Any]]) -> None:
        """After a state dict was loaded: ``beta1``/``beta2`` hold, ``"betas"`` follows."""
        self.seen = []
        for group in groups:
            self.link(group)
            self.added(group)

    def reconcile(self, groups: Sequence[dict[str, Any]]) -> None:
        """Make every group's ``"betas"`` and ``beta1``/``beta2`` agree, in place: write
        :meth:`reconciled`."""
        self.write(groups, self.reconciled(groups))

    def reconciled(self, groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """What reconciling writes into each group (``{}`` where nothing changes), writing
        nothing: a step checks its groups as they will be and writes only when every check
        passes, so a step that fails leaves both sides and the memory as the user left them.

        Of two sides that disagree, the one that changed since :attr:`seen` wins; a group
        without such a memory (appended to ``param_groups`` by hand) must agree already. A
        removed ``"betas"`` is restored from ``beta1``/``beta2``.

        Raises
        ------
        ValueError
            When both sides changed to different values, or ``"betas"`` is not a pair.
        """
        if self.keys is None:
            return [{} for _ in groups]
        keys, seen = self.keys, self.seen
        changes: list[dict[str, Any]] = []
        for index, group in enumerate(groups):
            change: dict[str, Any] = {}
            pair: Pair = (group[keys[0]], group[keys[1]])
            betas = _as_pair(group[BETAS], f"param group {index}") if BETAS in group else pair
            if not _same_pair(betas, pair):
                # (the memory is read only here: a compiled step does not guard on it)
                last = seen[index] if index < len(seen) else None
                betas_moved = last is None or not _same_pair(betas, last)
                pair_moved = last is None or not _same_pair(pair, last)
                if betas_moved and pair_moved:
                    raise ValueError(
                        f"param group {index}: betas={betas!r} and ({keys[0]}, {keys[1]})={pair!r} disagree and "
                        "both changed since the last step; set one of them (they are kept equal)"
                    )
                if betas_moved:
                    change[keys[0]], change[keys[1]] = pair = betas
            if not _identical(group.get(BETAS), pair):
                change[BETAS] = pair
            changes.append(change)
        return changes

    def write(self, groups: Sequence[dict[str, Any]], changes: Sequence[Mapping[str, Any]]) -> None:
        """Write what :meth:`reconciled` found into the groups, and remember each pair."""
        if self.keys is None:
            return
        seen = self.seen
        for index, (group, change) in enumerate(zip(groups, changes, strict=True)):
            # Key by key: group.update, even with nothing in it, made torch.compile guard on
            # len(group), and the next compiled step recompile.
            for key, value in change.items():
                group[key] = value
            pair = group[BETAS]
            if index < len(seen):
                seen[index] = pair
            else:
                seen.append(pair)
        del seen[len(groups) :]


def stage_values(groups: Sequence[Mapping[str, Any]], stages: Sequence[Stage]) -> list[list[dict[str, Any]]]:
    """``values[group][stage]``: each stage's hyperparameters in each group, by local name."""
    return [[{name: group[key] for name, key in stage.hyper_keys.items()} for stage in stages] for group in groups]


def _as_pair(value: object, where: str) -> Pair:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (value[0], value[1])
    raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {value!r}")


def _same(a: object, b: object) -> bool:
    """Whether two hyperparameter values are the same: one tensor, or equal numbers."""
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


def _same_pair(a: Pair, b: Pair) -> bool:
    return _same(a[0], b[0]) and _same(a[1], b[1])


def _identical(value: object, pair: Pair) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] is pair[0] and value[1] is pair[1]
