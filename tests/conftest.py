"""Shared test configuration: the rules and modifiers under test, read from the registry.

This directory is on ``sys.path`` (pytest's default import mode), so the helpers beside this
file (``compiler``, ``numpy_reference``) import from any test folder, ``tests/cli`` included.
Test modules take the name lists from :mod:`torchupdates.registry` directly
(``from torchupdates.registry import RULE_NAMES as RULES``), the same tuples as :data:`RULES`
and :data:`MODIFIERS` here; a test that wants one case per rule or modifier can ask for the
``rule_name``/``rule_entry`` or ``modifier_name``/``modifier_entry`` arguments instead.
"""

from __future__ import annotations

import pytest

from torchupdates import registry

RULES: tuple[str, ...] = registry.RULE_NAMES
"""The nine rules, in Lasagne's order."""

MODIFIERS: tuple[str, ...] = registry.MODIFIER_NAMES
"""``apply_momentum`` and ``apply_nesterov_momentum``."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One case per rule for a test that takes ``rule_name`` or ``rule_entry`` (or both, then of the
    same rule), likewise per modifier for ``modifier_name``/``modifier_entry``."""
    for kind, names, entries in (("rule", RULES, registry.RULES), ("modifier", MODIFIERS, registry.MODIFIERS)):
        wanted = [arg for arg in (f"{kind}_name", f"{kind}_entry") if arg in metafunc.fixturenames]
        if wanted:
            cases = [{f"{kind}_name": name, f"{kind}_entry": entries[name]} for name in names]
            metafunc.parametrize(wanted, [[case[arg] for arg in wanted] for case in cases], ids=names)
