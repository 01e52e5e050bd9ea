"""Rule specifications for the command line: ``adam``, ``nesterov(rmsprop)``, ``adam:0.003``.

A specification names one of the public rules, optionally wrapped (any number of times) in
``momentum(...)`` or ``nesterov(...)`` (also spelt ``apply_momentum(...)``,
``apply_nesterov_momentum(...)``, ``nesterov_momentum(...)``), optionally followed by
``:LEARNING_RATE``. Without a learning rate, the rule's default for the digits comparison
is used, divided by 10 per momentum wrapper: momentum 0.9 makes steps about
``1 / (1 - 0.9) = 10`` times larger.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor

from ..optimizer import Optimizer
from ..registry import MODIFIERS, RULES

__all__ = ["DEFAULT_LEARNING_RATES", "RULE_NAMES", "RuleSpec", "parse_rule", "parse_rules"]

DEFAULT_LEARNING_RATES: dict[str, float] = {
    "sgd": 0.3,
    "momentum": 0.1,
    "nesterov_momentum": 0.1,
    "adagrad": 0.03,
    "rmsprop": 0.003,
    "adadelta": 1.0,
    "adam": 0.003,
    "adamax": 0.03,
    "amsgrad": 0.003,
}
"""Learning rates that train the digits MLP of ``compare`` well.

Tuned on ``compare``'s defaults (20 epochs, batch size 32, 64-128-128-10 MLP) by the best mean
validation accuracy over seeds 0, 1, 2 on the grid 1e-4, 3e-4, ..., 3 (adadelta keeps its
own default 1, within 1% of the best). Momentum 0.9 is best with about a tenth of a rule's
own learning rate, hence the factor for wrappers; ``momentum`` and ``nesterov_momentum``
(sgd with momentum) have their own tuned values.
"""

RULE_NAMES: tuple[str, ...] = tuple(RULES)
"""The public update rules (:data:`torchupdates.registry.RULES`), in the order ``compare`` runs them by default."""

_WRAPPERS: dict[str, str] = {
    "momentum": "momentum",
    "apply_momentum": "momentum",
    "nesterov": "nesterov",
    "nesterov_momentum": "nesterov",
    "apply_nesterov_momentum": "nesterov",
}
"""Spellings of the modifiers accepted around a rule, to their canonical names."""

_APPLY: dict[str, Callable[..., Optimizer]] = {
    "momentum": MODIFIERS["apply_momentum"].factory,
    "nesterov": MODIFIERS["apply_nesterov_momentum"].factory,
}

_MOMENTUM_SCALE = 0.1
"""Default learning rate factor per momentum wrapper: ``1 - momentum`` for momentum 0.9."""

_CALL = re.compile(r"([a-z_]+)\((.*)\)")

SYNTAX_HELP = (
    "RULE is one of " + ", ".join(RULE_NAMES) + "; wrap it as momentum(RULE) or nesterov(RULE) "
    "(nestable; apply_momentum/apply_nesterov_momentum are accepted too) and append :LR to "
    "set its learning rate, e.g. nesterov(rmsprop):0.0003"
)


@dataclass(frozen=True)
class RuleSpec:
    """A parsed rule specification.

    Attributes
    ----------
    rule : str
        The public rule at the core, e.g. ``"rmsprop"``.
    wrappers : tuple of str
        Modifiers applied to it, innermost first: ``"momentum"`` or ``"nesterov"``.
    learning_rate : float
        The learning rate given after ``:``, else the default for the comparison.
    explicit_learning_rate : bool
        Whether the learning rate was given.
    """

    rule: str
    wrappers: tuple[str, ...]
    learning_rate: float
    explicit_learning_rate: bool

    @property
    def expression(self) -> str:
        """The rule and its wrappers in canonical form, e.g. ``"nesterov(rmsprop)"``."""
        text = self.rule
        for wrapper in self.wrappers:
            text = f"{wrapper}({text})"
        return text

    @property
    def label(self) -> str:
        """A unique name: the expression, with ``:LR`` when a learning rate was given."""
        if self.explicit_learning_rate:
            return f"{self.expression}:{self.learning_rate:g}"
        return self.expression

    def build(self, params: Iterable[Tensor], engine: str = "foreach", max_grad_norm: float | None = None) -> Optimizer:
        """Create the optimizer for ``params``.

        Parameters
        ----------
        params : iterable of Tensor
            The parameters to optimize.
        engine : str, optional
            The engine the rule runs on (see :class:`torchupdates.Optimizer`).
        max_grad_norm : float, optional
            Gradient clipping inside the step (the rule's ``max_grad_norm``).

        Returns
        -------
        Optimizer
            The rule with its wrappers applied, innermost first.
        """
        optimizer = RULES[self.rule].factory(
            params, learning_rate=self.learning_rate, engine=engine, max_grad_norm=max_grad_norm
        )
        for wrapper in self.wrappers:
            optimizer = _APPLY[wrapper](optimizer)
        return optimizer


def _unknown(kind: str, name: str, valid: Iterable[str]) -> ValueError:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint}; valid {kind}s: {', '.join(valid)}")


def _parse_learning_rate(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad learning rate {text!r} in {spec!r}: not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"bad learning rate {text!r} in {spec!r}: it must be a positive number")
    return value


def parse_rule(text: str) -> RuleSpec:
    """Parse one rule specification.

    Parameters
    ----------
    text : str
        E.g. ``"adam"``, ``"nesterov(rmsprop)"``, ``"apply_momentum(adagrad):0.01"``.
        Case and spaces are ignored.

    Returns
    -------
    RuleSpec

    Raises
    ------
    ValueError
        For an unknown rule or modifier, unbalanced parentheses or a bad learning rate;
        the message lists the valid names.

    Examples
    --------
    >>> spec = parse_rule("nesterov(rmsprop):1e-4")
    >>> spec.rule, spec.wrappers, spec.learning_rate, spec.label
    ('rmsprop', ('nesterov',), 0.0001, 'nesterov(rmsprop):0.0001')
    >>> parse_rule("momentum(adam)").learning_rate  # adam's default / 10
    0.0003
    """
    spec = "".join(text.split()).lower()
    if not spec:
        raise ValueError("empty rule name; valid rules: " + ", ".join(RULE_NAMES))
    expression, colon, rate_text = spec.partition(":")
    outer_first: list[str] = []
    while (call := _CALL.fullmatch(expression)) is not None:
        wrapper, expression = call.groups()
        if wrapper not in _WRAPPERS:
            raise _unknown("modifier", wrapper, ("momentum", "nesterov"))
        outer_first.append(_WRAPPERS[wrapper])
    if "(" in expression or ")" in expression:
        raise ValueError(f"cannot parse rule {text.strip()!r}: write RULE, momentum(RULE) or nesterov(RULE)")
    if expression not in RULES:
        error = _unknown("rule", expression, RULE_NAMES)
        raise ValueError(f"{error}; wrap one as momentum(RULE) or nesterov(RULE)")
    wrappers = tuple(reversed(outer_first))
    if colon:
        learning_rate = _parse_learning_rate(rate_text, text.strip())
    else:
        learning_rate = DEFAULT_LEARNING_RATES[expression] * _MOMENTUM_SCALE ** len(wrappers)
        learning_rate = float(f"{learning_rate:.6g}")  # 0.003 * 0.1 is 0.0003, not 0.00030000000000000003
    return RuleSpec(expression, wrappers, learning_rate, bool(colon))


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def parse_rules(text: str) -> list[RuleSpec]:
    """Parse a comma-separated list of rule specifications.

    Parameters
    ----------
    text : str
        E.g. ``"sgd,adam:0.003,nesterov(rmsprop)"``.

    Returns
    -------
    list of RuleSpec
        In the given order.

    Raises
    ------
    ValueError
        For a bad specification (see :func:`parse_rule`), an empty list or a rule given twice.

    Examples
    --------
    >>> [spec.label for spec in parse_rules("sgd, adam:0.01, momentum(adam)")]
    ['sgd', 'adam:0.01', 'momentum(adam)']
    """
    specs = [parse_rule(part) for part in _split_top_level(text)]
    labels = [spec.label for spec in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"rule {label!r} is given more than once")
    return specs
