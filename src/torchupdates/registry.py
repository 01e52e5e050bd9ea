"""The rules and modifiers in one table: name, factory, transforms, defaults.

Everything that needs "every rule" (the command line, the benchmarks, the tests) reads it
here instead of keeping its own list::

    >>> from torchupdates.registry import RULES, MODIFIERS
    >>> list(RULES)[:3]
    ['sgd', 'momentum', 'nesterov_momentum']
    >>> RULES["adam"].defaults
    {'learning_rate': 0.001, 'beta1': 0.9, 'beta2': 0.999, 'epsilon': 1e-08}
    >>> RULES["momentum"].transforms == (RULES["sgd"].transform, MODIFIERS["apply_momentum"].transform)
    True

Not re-exported by ``import torchupdates``: it describes the public functions rather than
adding one, and ``torchupdates.registry`` is the one place to look it up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import modifiers, rules
from .optimizer import Optimizer
from .transform import Hyperparameter, Transform

__all__ = ["MODIFIERS", "MODIFIER_NAMES", "RULES", "RULE_NAMES", "Entry"]


@dataclass(frozen=True)
class Entry:
    """One public rule or modifier.

    Attributes
    ----------
    name : str
        The public name, also the function's name in :mod:`torchupdates`.
    factory : callable
        The public function: ``factory(params, ...)`` for a rule,
        ``factory(optimizer, params=None, ...)`` for a modifier; returns an :class:`Optimizer`.
    transforms : tuple of Transform
        What the factory builds: the rule's transform, then the modifiers on top of it
        (``momentum`` is ``sgd`` followed by ``apply_momentum``).
    """

    name: str
    factory: Callable[..., Optimizer]
    transforms: tuple[Transform, ...]

    @property
    def transform(self) -> Transform:
        """The innermost transform: the rule itself (``sgd`` for ``momentum``)."""
        return self.transforms[0]

    @property
    def hyperparameters(self) -> tuple[Hyperparameter, ...]:
        """The hyperparameters of every transform, in the factory's order."""
        return tuple(spec for transform in self.transforms for spec in transform.hyperparameters)

    @property
    def defaults(self) -> dict[str, Any]:
        """Each hyperparameter's default, ``None`` where the caller must give it."""
        return {spec.name: spec.default for spec in self.hyperparameters}

    @property
    def state(self) -> tuple[str, ...]:
        """The state tensors kept per parameter (besides a step counter)."""
        return tuple(name for transform in self.transforms for name in transform.state)

    @property
    def counts_steps(self) -> bool:
        """Whether a step counter is kept per parameter (bias corrections)."""
        return any(transform.counts_steps for transform in self.transforms)


def _entries(*entries: Entry) -> Mapping[str, Entry]:
    return MappingProxyType({entry.name: entry for entry in entries})


MODIFIERS: Mapping[str, Entry] = _entries(
    Entry("apply_momentum", modifiers.apply_momentum, (modifiers.MOMENTUM,)),
    Entry("apply_nesterov_momentum", modifiers.apply_nesterov_momentum, (modifiers.NESTEROV_MOMENTUM,)),
)
"""The two modifiers, by name."""

RULES: Mapping[str, Entry] = _entries(
    Entry("sgd", rules.sgd, (rules.SGD,)),
    Entry("momentum", rules.momentum, (rules.SGD, modifiers.MOMENTUM)),
    Entry("nesterov_momentum", rules.nesterov_momentum, (rules.SGD, modifiers.NESTEROV_MOMENTUM)),
    Entry("adagrad", rules.adagrad, (rules.ADAGRAD,)),
    Entry("rmsprop", rules.rmsprop, (rules.RMSPROP,)),
    Entry("adadelta", rules.adadelta, (rules.ADADELTA,)),
    Entry("adam", rules.adam, (rules.ADAM,)),
    Entry("adamax", rules.adamax, (rules.ADAMAX,)),
    Entry("amsgrad", rules.amsgrad, (rules.AMSGRAD,)),
)
"""The nine rules, by name, in Lasagne's order."""

RULE_NAMES: tuple[str, ...] = tuple(RULES)
"""The rules' names, in Lasagne's order."""

MODIFIER_NAMES: tuple[str, ...] = tuple(MODIFIERS)
"""The modifiers' names."""
