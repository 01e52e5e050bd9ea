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

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ._chain_keys import ALIASES
from .engines import Stage
from .grads import check_leaf, describe
from .transform import check_hyperparameter

__all__ = ["BETAS", "BetasLink", "betas_keys", "check_group", "new_group", "stage_values"]

BETAS = "betas"
"""torch's key for the pair ``(beta1, beta2)``."""

Pair = tuple[Any, Any]


def betas_keys(stages: Sequence[Stage]) -> tuple[str, str] | None:
    """The group keys of the rule's ``beta1`` and ``beta2``, when it has both (else ``None``)."""
    keys = stages[0].hyper_keys
    if "beta1" in keys and "beta2" in keys:
        return keys["beta1"], keys["beta2"]
    return None


def new_group(
    param_group: Mapping[str, Any], defaults: Mapping[str, Any], offset: int, betas: tuple[str, str] | None
) -> dict[str, Any]:
    """A new param group: a checked copy of ``param_group`` completed from ``defaults``.

    Parameters
    ----------
    param_group : dict
        ``"params"`` (a tensor or an ordered collection of tensors) and overrides.
    defaults : dict
        The optimizer's defaults, for every key not given.
    offset : int
        The flat position of the group's first parameter (for error messages).
    betas : pair of str or None
        The group keys of ``beta1`` and ``beta2`` (see :func:`betas_keys`).

    Returns
    -------
    dict
        ``"learning_rate"`` is stored as ``"lr"``. With ``betas``, a ``"betas"`` given
        sets ``beta1`` and ``beta2``, and ``"betas"`` is always their pair.

    Raises
    ------
    TypeError, ValueError
        For parameters that are not leaf floating-point tensors, or given in a set; for a
        key given under both its names; for ``"betas"`` that is no pair or contradicts a
        ``beta1``/``beta2`` given beside it.
    """
    if not isinstance(param_group, dict):
        raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    given = set(group)
    params = group.get("params")
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise TypeError("parameters must be given in an ordered collection (a list), not a set")
    elif params is None:
        raise ValueError("a param group needs a 'params' entry")
    group["params"] = list(params)
    for position, param in enumerate(group["params"], offset):
        check_leaf(position, param)
        if not (param.is_floating_point() or param.is_complex()):
            raise TypeError(f"{describe(position, param)} must be floating point or complex to be optimized")
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
    for stage in stages:
        for spec in stage.transform.hyperparameters:
            value = group[stage.hyper_keys[spec.name]]
            check_hyperparameter(f"{owner}, param group {index}", spec, value, read_tensors=not traced)


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
        """Make every group's ``"betas"`` and ``beta1``/``beta2`` agree, in place.

        Of two sides that disagree, the one that changed since :attr:`seen` wins; a group
        without such a memory (appended to ``param_groups`` by hand) must agree already. A
        removed ``"betas"`` is restored from ``beta1``/``beta2``.

        Raises
        ------
        ValueError
            When both sides changed to different values, or ``"betas"`` is not a pair.
        """
        if self.keys is None:
            return
        keys, seen = self.keys, self.seen
        for index, group in enumerate(groups):
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
                    group[keys[0]], group[keys[1]] = pair = betas
            if not _identical(group.get(BETAS), pair):
                group[BETAS] = pair
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
