"""The rule functions as a torch user meets them: docstrings with every parameter, and
torch.optim's keywords (``lr=``, ``betas=``) where they mean the same thing."""

from __future__ import annotations

import inspect
import pydoc

import pytest
import torch

import torchupdates as updates
from torchupdates import registry
from torchupdates.rules import SHARED_PARAMETERS

ADAM_FAMILY = [name for name, entry in registry.RULES.items() if "beta1" in entry.defaults]


def params() -> list[torch.Tensor]:
    return [torch.nn.Parameter(torch.ones(3))]


def group_values(optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}


# --- docstrings ---------------------------------------------------------------------------


def test_every_rule_documents_every_parameter_of_its_signature(rule_entry: registry.Entry) -> None:
    doc = inspect.getdoc(rule_entry.factory) or ""
    for name in inspect.signature(rule_entry.factory).parameters:
        assert f"\n{name} :" in doc, f"{rule_entry.name}: {name} is not documented"
    assert "{" + "params}" not in doc and "As for :func:" not in doc  # every placeholder filled


def test_the_shared_entries_appear_verbatim_in_every_rule(rule_entry: registry.Entry) -> None:
    doc = inspect.getdoc(rule_entry.factory) or ""
    for name in ("params", "lr", "engine", "state_dtype"):
        assert SHARED_PARAMETERS[name] in doc
    assert (SHARED_PARAMETERS["betas"] in doc) == (rule_entry.name in ADAM_FAMILY)


def test_the_engine_entry_names_the_three_engines_and_what_they_need() -> None:
    engine = SHARED_PARAMETERS["engine"]
    for text in ('"foreach"', "(default)", "no compiler", '"reference"', '"compiled"', "torch.compile"):
        assert text in engine
    for text in ("C++ compiler", "Triton", "checked when the optimizer is built"):
        assert text in " ".join(engine.split())


def test_help_shows_the_signature_and_the_full_text() -> None:
    text = pydoc.render_doc(updates.adam, renderer=pydoc.plaintext)
    signature = text.splitlines()[2]
    assert signature.startswith("adam(params") and "learning_rate: 'Scalar' = 0.001" in signature
    assert "*, lr: 'Scalar | None' = None, betas:" in signature
    for fragment in ("Kingma", "bias-corrected", "param groups", "C++ compiler", "bfloat16", "torch.optim's name"):
        assert fragment in text


# --- lr= ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", registry.RULE_NAMES)
def test_lr_is_an_alias_of_learning_rate(name: str) -> None:
    factory = registry.RULES[name].factory
    by_alias, by_name = factory(params(), lr=0.03), factory(params(), learning_rate=0.03)
    assert group_values(by_alias) == group_values(by_name)
    assert by_alias.param_groups[0]["lr"] == 0.03
    eta = torch.tensor(0.5)
    assert factory(params(), lr=eta).param_groups[0]["lr"] is eta  # a tensor is kept, read at every step


@pytest.mark.parametrize("name", registry.RULE_NAMES)
def test_lr_and_learning_rate_together_is_a_type_error(name: str) -> None:
    factory = registry.RULES[name].factory
    with pytest.raises(TypeError, match=rf"{name}\(\) got learning_rate=0.1 and its alias lr=0.2: give one"):
        factory(params(), 0.1, lr=0.2)
    with pytest.raises(TypeError, match=r"give one"):
        factory(params(), learning_rate=0.1, lr=0.2)


def test_sgd_still_needs_a_learning_rate() -> None:
    with pytest.raises(TypeError, match=r"missing required hyperparameter 'learning_rate'"):
        updates.sgd(params())
    assert updates.sgd(params(), 0.1).param_groups[0]["lr"] == 0.1


def test_lr_checks_its_value_like_learning_rate() -> None:
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0"):
        updates.adam(params(), lr=-1.0)


# --- betas= and other torch spellings -------------------------------------------------------


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_betas_sets_beta1_and_beta2_in_the_adam_family(name: str) -> None:
    factory = registry.RULES[name].factory
    by_pair = factory(params(), lr=0.01, betas=(0.8, 0.99))
    by_name = factory(params(), learning_rate=0.01, beta1=0.8, beta2=0.99)
    assert group_values(by_pair) == group_values(by_name)
    assert by_pair.param_groups[0]["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_betas_with_beta1_or_beta2_or_not_a_pair_is_a_type_error(name: str) -> None:
    factory = registry.RULES[name].factory
    with pytest.raises(TypeError, match=r"got betas=\(0.8, 0.99\) and beta1: give betas or beta1/beta2"):
        factory(params(), beta1=0.9, betas=(0.8, 0.99))
    with pytest.raises(TypeError, match=r"beta1 and beta2"):
        factory(params(), 0.001, 0.9, 0.99, betas=[0.8, 0.99])
    with pytest.raises(TypeError, match=r"betas as a pair \(beta1, beta2\)"):
        factory(params(), betas=0.9)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        factory(params(), betas=(0.9, 1.0))


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adadelta"])
def test_betas_elsewhere_is_pythons_type_error(name: str) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'betas'"):
        registry.RULES[name].factory(params(), lr=0.1, betas=(0.9, 0.999))


def test_torch_spellings_name_the_keyword_used_here() -> None:
    with pytest.raises(TypeError, match=r"adam\(\) got an unexpected keyword argument 'eps': here it is 'epsilon'"):
        updates.adam(params(), eps=1e-6)
    with pytest.raises(TypeError, match=r"'alpha': here it is 'rho'"):
        updates.rmsprop(params(), lr=0.01, alpha=0.99)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'alpha'$"):
        updates.adam(params(), alpha=0.99)  # adam has no rho: Python's own message


def test_the_step_options_are_keywords_of_every_rule_with_the_optimizers_defaults(rule_entry: registry.Entry) -> None:
    rule_parameters = inspect.signature(rule_entry.factory).parameters
    optimizer_parameters = inspect.signature(updates.Optimizer).parameters
    for name in ("engine", "state_dtype", "skip_nonfinite", "max_grad_norm"):
        assert rule_parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert rule_parameters[name].default == optimizer_parameters[name].default


def test_a_misspelt_keyword_is_pythons_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"^adam\(\) got an unexpected keyword argument 'learing_rate'$"):
        updates.adam(params(), learing_rate=0.1)
    with pytest.raises(TypeError, match=r"^sgd\(\) got an unexpected keyword argument 'weight_decay'$"):
        updates.sgd(params(), 0.1, weight_decay=0.1)
