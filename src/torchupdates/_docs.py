"""Docstring text that several public functions share, written once and filled in.

A line ``{name}`` alone in a docstring stands for the fragment of that name, indented as the
line. Fragments are numpydoc text: parameter entries, whole sections, references.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

__all__ = ["FRAGMENTS", "fill", "filled"]

_PLACEHOLDER = re.compile(r"^([ \t]*)\{(\w+)\}[ \t]*$", re.MULTILINE)

FRAGMENTS: Mapping[str, str] = {
    "momentum_modifier_result": """\
Returns
-------
Optimizer
    A new optimizer that takes over the wrapped one's param groups and state; step the
    new one only. State per parameter: ``velocity`` (zero at the start).

Raises
------
TypeError
    When ``optimizer`` is not a torchupdates :class:`Optimizer`.
ValueError
    When ``params`` holds a tensor the optimizer does not optimize, or ``momentum`` is
    out of range.""",
    "max_norm_references": """\
References
----------
.. [1] Srivastava, N., Hinton, G., Krizhevsky, A., Sutskever, I. and Salakhutdinov, R.
   (2014): Dropout: A simple way to prevent neural networks from overfitting.
   JMLR, 15:1929-1958, section 5.1.""",
}
"""Fragments shared by the modifiers and the constraints."""

_F = TypeVar("_F", bound=Callable[..., object])


def fill(doc: str, expand: Callable[[str], Iterable[str]]) -> str:
    """``doc`` with each placeholder line replaced by the texts ``expand(name)``, one after another."""

    def entry(match: re.Match[str]) -> str:
        indent, name = match.groups()
        return "\n".join(textwrap.indent(text, indent) for text in expand(name))

    return _PLACEHOLDER.sub(entry, doc)


def filled(function: _F) -> _F:
    """Decorator: ``function``'s docstring with its placeholders replaced from :data:`FRAGMENTS`."""
    function.__doc__ = fill(function.__doc__ or "", lambda name: [FRAGMENTS[name]])
    return function
