"""Shared test configuration: the rules and modifiers under test, read from the registry.

This directory is on ``sys.path`` (pytest's default import mode), so the helpers beside this
file (``compiler``, ``numpy_reference``) import from any test folder, ``tests/cli`` included.
Test modules take the name lists from :mod:`torchupdates.registry` directly
(``from torchupdates.registry import RULE_NAMES as RULES``), the same tuples as :data:`RULES`
and :data:`MODIFIERS` here; a test that wants one case per rule or modifier can ask for the
``rule_name``/``rule_entry`` or ``modifier_name``/``modifier_entry`` fixtures instead.
"""

from __future__ import annotations

import pytest

from torchupdates import registry

RULES: tuple[str, ...] = registry.RULE_NAMES
"""The nine rules, in Lasagne's order."""

MODIFIERS: tuple[str, ...] = registry.MODIFIER_NAMES
"""``apply_momentum`` and ``apply_nesterov_momentum``."""


@pytest.fixture(params=RULES)
def rule_name(request: pytest.FixtureRequest) -> str:
    """Each rule's name in turn."""
    name: str = request.param
    return name


@pytest.fixture
def rule_entry(rule_name: str) -> registry.Entry:
    """Each rule's registry entry in turn (name, factory, transforms, defaults)."""
    return registry.RULES[rule_name]


@pytest.fixture(params=MODIFIERS)
def modifier_name(request: pytest.FixtureRequest) -> str:
    """Each modifier's name in turn."""
    name: str = request.param
    return name


@pytest.fixture
def modifier_entry(modifier_name: str) -> registry.Entry:
    """Each modifier's registry entry in turn."""
    return registry.MODIFIERS[modifier_name]
