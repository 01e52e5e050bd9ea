"""The registry is the one list of rules: it matches the public functions, their signatures,
their docstrings and the independent NumPy transcription."""

from __future__ import annotations

import inspect
from typing import Any

import torch

import numpy_reference as ref
import torchupdates
from torchupdates import registry

NOT_HYPERPARAMETERS = {"params", "optimizer", "engine", "state_dtype", "skip_nonfinite", "max_grad_norm", "lr", "betas"}
"""Parameters of the factories that are no hyperparameter of a transform (``lr`` and ``betas``
are torch's spellings of hyperparameters, default ``None``: not given)."""


def signature_defaults(factory: Any) -> dict[str, Any]:
    """The factory's hyperparameter keywords and defaults (``None`` where one is required)."""
    parameters = inspect.signature(factory).parameters.values()
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in parameters
        if p.name not in NOT_HYPERPARAMETERS
    }


def test_the_registry_lists_every_public_rule_and_modifier_once() -> None:
    public = {name for name in torchupdates.__all__ if name in registry.RULES or name in registry.MODIFIERS}
    assert set(registry.RULES) | set(registry.MODIFIERS) == public
    assert len(registry.RULES) == 9 and len(registry.MODIFIERS) == 2
    for entry in (*registry.RULES.values(), *registry.MODIFIERS.values()):
        assert entry.factory is getattr(torchupdates, entry.name)
        assert entry.factory.__name__ == entry.name
    assert tuple(registry.RULES) == registry.RULE_NAMES and tuple(registry.MODIFIERS) == registry.MODIFIER_NAMES
    assert "registry" not in torchupdates.__all__


def test_factory_signature_defaults_are_the_transform_defaults(rule_entry: registry.Entry) -> None:
    assert signature_defaults(rule_entry.factory) == rule_entry.defaults


def test_modifier_signature_defaults_are_the_transform_defaults(modifier_entry: registry.Entry) -> None:
    assert signature_defaults(modifier_entry.factory) == modifier_entry.defaults


def test_defaults_and_state_match_the_numpy_transcription(rule_name: str) -> None:
    entry = registry.RULES[rule_name]
    assert entry.defaults == ref.DEFAULTS[rule_name]
    spec = ref.RULES[rule_name]
    assert entry.state == spec.state + tuple(s for m in spec.modifiers for s in ref.MODIFIERS[m].state)
    assert entry.counts_steps == spec.counts_steps
    assert tuple(t.name for t in entry.transforms[1:]) == spec.modifiers


def test_entries_build_optimizers_with_the_listed_state(rule_entry: registry.Entry) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    keywords = {"learning_rate": 0.1} if rule_entry.defaults["learning_rate"] is None else {}
    optimizer = rule_entry.factory([param], **keywords)
    param.grad = torch.full((3,), 0.5)
    optimizer.step()
    state = set(optimizer.state[param])
    assert state - {"step"} == set(rule_entry.state)
    assert ("step" in state) == rule_entry.counts_steps
    group = optimizer.param_groups[0]
    for name, default in rule_entry.defaults.items():
        key = "lr" if name == "learning_rate" else name
        assert group[key] == (keywords.get(name) if default is None else default)
