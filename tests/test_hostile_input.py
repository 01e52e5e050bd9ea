"""Hostile input: each case raises a ValueError/TypeError naming the culprit, before anything is
written (every parameter and state tensor bitwise as it was), on every engine a step involves.
Then a property: random chains agree across engines, step(x) == apply_updates(updates(x)) and
finite inputs stay finite."""

from __future__ import annotations

import copy
import decimal
import fractions
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchupdates as updates
from compiler import needs_compiler

ENGINES = ["foreach", "reference", pytest.param("compiled", marks=needs_compiler)]

warnings.filterwarnings("ignore", message=r"Sparse (CSR|CSC|BSR) tensor support is in beta", category=UserWarning)


# --- snapshot of everything a failed call must leave as it was ------------------------------


def snapshot(opt):
    return {
        "params": [(p, _copy(p)) for g in opt.param_groups for p in g["params"] if isinstance(p, torch.Tensor)],
        "state": {id(p): (p, {k: (v, _copy(v)) for k, v in s.items()}) for p, s in opt.state.items() if s},
        "groups": [{k: (v, _copy(v)) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "group_params": [list(g["params"]) for g in opt.param_groups],
    }


def assert_unchanged(opt, snap):
    for param, saved in snap["params"]:
        assert param.dtype == saved.dtype
        assert torch.equal(param.detach(), saved), "a parameter was written"
    current = {id(p): s for p, s in opt.state.items() if s}
    assert current.keys() == snap["state"].keys(), "state was created or dropped"
    for pid, (_, entries) in snap["state"].items():
        assert current[pid].keys() == entries.keys()
        for key, (obj, saved) in entries.items():
            now = current[pid][key]
            if isinstance(saved, torch.Tensor):
                assert now is obj, f"state tensor {key!r} was replaced"
                assert now.dtype == saved.dtype and torch.equal(now, saved), f"state tensor {key!r} was written"
            else:
                assert now == saved
    assert len(opt.param_groups) == len(snap["groups"])
    for group, saved, params in zip(opt.param_groups, snap["groups"], snap["group_params"], strict=True):
        assert {k for k in group if k != "params"} == saved.keys()
        for key, (obj, value) in saved.items():
            now = group[key]
            if isinstance(value, torch.Tensor):
                assert now is obj and (value.is_meta or torch.equal(now, value)), key
            else:
                assert now == value, key
        assert all(a is b for a, b in zip(group["params"], params, strict=True))


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class Trained:
    """``rule`` on w (3, 4) and b (4,) in group 0 and m (2, 3) in group 1, momentum on w and m,
    stepped twice: parameter 2 is in the last group, so a step that wrote group by group before
    failing on it would have written group 0."""

    def __init__(self, engine="foreach", rule="adam", **kwargs):
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 4, generator=gen).requires_grad_()
        self.b = torch.randn(4, generator=gen).requires_grad_()
        self.m = torch.randn(2, 3, generator=gen).requires_grad_()
        self.params = [self.w, self.b, self.m]
        groups = [{"params": [self.w, self.b]}, {"params": [self.m], "lr": 0.02}]
        base = getattr(updates, rule)(groups, 0.01, engine=engine, **kwargs)
        self.opt = updates.apply_momentum(base, params=[self.w, self.m], momentum=0.5)
        for k in range(2):
            self.opt.step(self.grads(k))

    def grads(self, k=0):
        return [torch.full_like(p, 0.5 + k) - p for p in self.params]


def check_fails(opt, action, exc, match):
    snap = snapshot(opt)
    with pytest.raises(exc, match=match):
        action()
    assert_unchanged(opt, snap)


# --- 1. sparse gradients of every layout ----------------------------------------------------

LAYOUTS = {
    "coo": lambda g: g.to_sparse(),
    "csr": lambda g: g.to_sparse_csr(),
    "csc": lambda g: g.to_sparse_csc(),
    "bsr": lambda g: g.to_sparse_bsr((1, 1)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_sparse_gradient_of_any_layout_rejected_by_dense_rules(engine, layout):
    setup = Trained(engine)
    grads = setup.grads()
    grads[2] = LAYOUTS[layout](grads[2])
    match = rf"adam, 2 params\) does not support sparse gradients \(parameter 2 .*sparse_{layout}"
    check_fails(setup.opt, lambda: setup.opt.step(grads), TypeError, match)
    if layout == "coo":  # (torch refuses the other layouts as .grad)
        for p, g in zip(setup.params, grads, strict=True):
            p.grad = g
        check_fails(setup.opt, lambda: setup.opt.step(), TypeError, match)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov_momentum"])
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_sparse_gradient_of_any_layout_densified_by_the_sgd_family(engine, rule, layout):
    sparse, dense = Trained(engine, rule), Trained(engine, rule)
    grads = dense.grads(2)
    sparse.opt.step([LAYOUTS[layout](g) if g.dim() == 2 else g for g in grads])
    dense.opt.step(grads)
    assert all(torch.equal(a, b) for a, b in zip(sparse.params, dense.params, strict=True))


# --- 2. a 0-d hyperparameter on a device that cannot serve the parameters -------------------


def test_meta_hyperparameter_rejected_at_construction():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"rmsprop: rho is a tensor on the meta device"):
        updates.rmsprop(p, rho=torch.tensor(0.9, device="meta"))
    with pytest.raises(ValueError, match=r"adam: beta2 is a tensor on the meta device"):
        updates.adam(p, beta2=torch.tensor(0.9, device="meta"))
    with pytest.raises(ValueError, match=r"param group 0: learning_rate is a tensor on the meta device"):
        updates.sgd([{"params": p, "lr": torch.tensor(0.1, device="meta")}], 0.1)


@pytest.mark.parametrize("key", ["beta2", "lr", "momentum"])
@pytest.mark.parametrize("engine", ENGINES)
def test_meta_hyperparameter_rejected_at_step(engine, key):
    setup = Trained(engine)
    setup.opt.param_groups[1][key] = torch.tensor(0.5, device="meta")
    name = {"lr": "learning_rate"}.get(key, key)
    match = rf"param group 1: {name} is a tensor on the meta device"
    check_fails(setup.opt, lambda: setup.opt.step(setup.grads()), ValueError, match)


def test_hyperparameter_device_must_match_the_parameters():
    # (only the CPU is here: a meta parameter stands for "another device")
    from torchupdates.transform import check_hyperparameter_device

    on_meta = torch.zeros(2, device="meta")
    check_hyperparameter_device("adam", "beta1", torch.tensor(0.9), [on_meta])  # a CPU scalar goes anywhere
    with pytest.raises(ValueError, match=r"adam: beta1 is a tensor on meta, but parameter 1 of the group is on cpu"):
        check_hyperparameter_device("adam", "beta1", torch.tensor(0.9, device="meta"), [on_meta, torch.zeros(2)])


# --- 3. numbers torch cannot take -----------------------------------------------------------

BAD_NUMBERS = [fractions.Fraction(1, 100), decimal.Decimal("0.01"), np.float32(0.01), np.int64(1)]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=lambda v: type(v).__name__)
def test_number_torch_cannot_take_rejected_at_construction(value):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=rf"adam: learning_rate must be a Python int or float .*{type(value).__name__}"):
        updates.adam(p, learning_rate=value)
    with pytest.raises(TypeError, match=r"param group 0: rho must be a Python int or float"):
        updates.rmsprop([{"params": p, "rho": value}])


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("engine", ENGINES)
def test_number_torch_cannot_take_rejected_at_step(engine, value):
    setup = Trained(engine)
    setup.opt.param_groups[1]["lr"] = value
    match = rf"param group 1: learning_rate must be a Python int or float .*{type(value).__name__}"
    check_fails(setup.opt, lambda: setup.opt.step(setup.grads()), TypeError, match)


def test_python_and_numpy_float64_numbers_are_taken():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    updates.sgd([a], np.float64(0.5)).step([torch.ones(2)])
    updates.sgd([b], 1).step([torch.ones(2)])
    assert torch.equal(a, torch.full((2,), 0.5)) and torch.equal(b, torch.zeros(2))


# --- 4. load_state_dict with state that does not fit ----------------------------------------


def _saved(**kwargs):
    return copy.deepcopy(Trained(**kwargs).opt.state_dict())


def _edit_state(key, value):
    def edit(saved):
        if value is None:
            del saved["state"][0][key]
        else:
            saved["state"][0][key] = value(saved["state"][0][key]) if callable(value) else value

    return edit


LOAD_FAILURES = [
    ("state of wrong shape", _edit_state("m", torch.zeros(5)), ValueError, r"parameter 0: 'm' has shape \(5,\)"),
    ("integer state", _edit_state("v", lambda v: v.long()), TypeError, r"parameter 0: 'v' has dtype torch.int64"),
    ("complex state", _edit_state("m", lambda v: v.to(torch.complex64)), TypeError, r"parameter 0: 'm' has dtype"),
    ("state on meta", _edit_state("m", lambda v: v.to("meta")), ValueError, r"parameter 0: 'm' holds no dense"),
    ("state not a tensor", _edit_state("m", [0.0] * 12), TypeError, r"parameter 0: 'm' must be a tensor"),
    ("step as a Python int", _edit_state("step", 2), TypeError, r"parameter 0: 'step' must be a tensor, got int"),
    ("step as float", _edit_state("step", torch.tensor(2.0)), TypeError, r"'step' must be a 0-d integer"),
    ("step of shape (1,)", _edit_state("step", torch.tensor([2])), TypeError, r"'step' must be a 0-d integer"),
    ("negative step", _edit_state("step", torch.tensor(-1)), ValueError, r"'step' is negative"),
    ("no step", _edit_state("step", None), ValueError, r"parameter 0 lacks \['step'\] beside \['m', 'v'\]"),
    ("no v", _edit_state("v", None), ValueError, r"parameter 0 lacks \['v'\] beside \['m', 'step'\]"),
    ("unknown state", _edit_state("momentum_buffer", torch.zeros(3, 4)), ValueError, r"'momentum_buffer'"),
    (
        "state for no parameter",
        lambda s: s["state"].__setitem__(7, {}),
        ValueError,
        r"state for parameter ids \[7\] that no param group lists",
    ),
    ("a group fewer", lambda s: s["param_groups"].pop(), ValueError, r"has 1 param groups, this optimizer 2"),
    ("a parameter fewer", lambda s: s["param_groups"][0]["params"].pop(), ValueError, r"group 0 has 1 parameters"),
    ("negative lr", lambda s: s["param_groups"][1].update(lr=-1.0), ValueError, r"saved param group 1.*learning_rate"),
    (
        "Fraction lr",
        lambda s: s["param_groups"][1].update(lr=fractions.Fraction(1, 2)),
        TypeError,
        r"saved param group 1.*learning_rate.*Fraction",
    ),
    ("no lr", lambda s: s["param_groups"][0].pop("lr"), ValueError, r"saved param group 0 lacks \['lr'\]"),
    (
        "unknown group key without 'rule'",
        lambda s: (s.pop("rule"), s["param_groups"][0].update(weight_decay=0.1)),
        ValueError,
        r"saved param group 0 has \['weight_decay'\]",
    ),
    ("from another rule", lambda s: s.update(rule="adamax"), ValueError, r"saved from adamax"),
]


@pytest.mark.parametrize(("edit", "exc", "match"), [pytest.param(e, x, m, id=i) for i, e, x, m in LOAD_FAILURES])
@pytest.mark.parametrize("engine", ENGINES)
def test_load_state_dict_that_does_not_fit_loads_nothing(engine, edit, exc, match):
    saved = _saved()
    edit(saved)
    setup = Trained(engine)
    check_fails(setup.opt, lambda: setup.opt.load_state_dict(saved), exc, match)
    setup.opt.step(setup.grads())  # still usable


def test_adam_state_without_rule_does_not_load_into_amsgrad():
    saved = _saved(rule="adam")
    del saved["rule"]
    setup = Trained(rule="amsgrad")
    match = r"parameter 0 lacks \['v_hat'\] beside \['m', 'step', 'v'\]"
    check_fails(setup.opt, lambda: setup.opt.load_state_dict(saved), ValueError, match)


@pytest.mark.parametrize(("rule", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("momentum", 0.9)])
def test_torch_sgd_state_does_not_load(rule, momentum):
    p = torch.nn.Parameter(torch.ones(3))
    torch_opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, weight_decay=0.1)
    p.grad = torch.ones(3)
    torch_opt.step()
    q = torch.nn.Parameter(torch.ones(3))
    opt = getattr(updates, rule)([q], 0.1)
    opt.step([torch.ones(3)])
    check_fails(opt, lambda: opt.load_state_dict(torch_opt.state_dict()), ValueError, r"'weight_decay'")


def test_state_dtype_is_recorded_and_never_narrowed_on_load():
    params = [torch.randn(4, 3, dtype=torch.bfloat16).requires_grad_()]
    wide = updates.adam(params, 0.01, state_dtype=torch.float32)
    wide.step([torch.randn(4, 3, dtype=torch.bfloat16)])
    saved = copy.deepcopy(wide.state_dict())
    assert saved["state_dtype"] == "float32"
    narrow = updates.adam([p.detach().clone().requires_grad_() for p in params], 0.01)
    narrow.step([torch.randn(4, 3, dtype=torch.bfloat16)])
    match = r"parameter 0: 'm' is torch.float32 \(it was saved with state_dtype=float32\).*state_dtype=torch.float32"
    check_fails(narrow, lambda: narrow.load_state_dict(saved), ValueError, match)
    assert updates.adam(params, 0.01).state_dict()["state_dtype"] is None
    # widening is lossless and allowed: bfloat16 state into a float32-state optimizer
    narrow_saved = copy.deepcopy(narrow.state_dict())
    wide.load_state_dict(narrow_saved)
    assert wide.state[params[0]]["m"].dtype == torch.float32


# --- 5. apply_updates checks every pair before the first write ------------------------------

LATE_BAD_VALUES = [
    ("complex into real", lambda v: v.to(torch.complex64), TypeError, r"complex64 cannot be cast"),
    ("on meta", lambda v: v.to("meta"), ValueError, r"meta device holds no values"),
    ("sparse", lambda v: v.to_sparse(), ValueError, r"layout torch.sparse_coo"),
    ("wrong shape", lambda v: v.reshape(-1)[:1], ValueError, r"shape \(1,\) cannot be written"),
    ("not a tensor", lambda v: v.tolist(), TypeError, r"tensors to tensors"),
]


@pytest.mark.parametrize(("bad", "exc", "match"), [pytest.param(b, e, m, id=i) for i, b, e, m in LATE_BAD_VALUES])
@pytest.mark.parametrize("engine", ENGINES)
def test_apply_updates_checks_every_pair_first(engine, bad, exc, match):
    setup = Trained(engine)
    upd = setup.opt.updates(setup.grads())
    last = list(upd)[-1]  # a state tensor of the last parameter: written last
    upd[last] = bad(upd[last])
    check_fails(setup.opt, lambda: updates.apply_updates(upd), exc, match)


@pytest.mark.parametrize("engine", ENGINES)
def test_apply_updates_float_into_a_step_counter(engine):
    setup = Trained(engine)
    upd = setup.opt.updates(setup.grads())
    counter = setup.opt.state[setup.m]["step"]
    upd[counter] = torch.tensor(3.5)
    check_fails(setup.opt, lambda: updates.apply_updates(upd), TypeError, r"float32 cannot be cast .*int64")


# --- 6. a parameter listed twice ------------------------------------------------------------


def test_parameter_listed_twice_at_construction():
    w, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"parameter 2 \(\(3,\) float32\) is parameter 0 again"):
        updates.adam([w, b, w])
    with pytest.raises(ValueError, match=r"parameter 2 \(\(3,\) float32\) is parameter 0 again"):
        updates.adam([{"params": [w]}, {"params": [b, w]}])
    opt = updates.adam([w, b])
    check_fails(opt, lambda: opt.add_param_group({"params": [b]}), ValueError, r"parameter 2 .* is parameter 1 again")


@pytest.mark.parametrize("engine", ENGINES)
def test_parameter_appended_twice_after_construction(engine):
    setup = Trained(engine)
    setup.opt.param_groups[1]["params"].append(setup.w)
    grads = [*setup.grads(), torch.ones(3, 4)]
    check_fails(setup.opt, lambda: setup.opt.step(grads), ValueError, r"parameter 3 .* is parameter 0 again")


# --- 7. unknown keys in a param group -------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "key", "value"),
    [
        ("sgd", "betas", (0.5, 0.6)),
        ("adam", "learing_rate", 0.1),
        ("adam", "weight_decay", 0.1),
        ("rmsprop", "beta1", 0.5),
    ],
)
def test_unknown_group_key(rule, key, value):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=rf"param group 1 has unknown key\(s\) \['{key}'\]: {rule} takes \[.*'lr'"):
        getattr(updates, rule)([{"params": [a]}, {"params": [b], key: value}], 0.1)
    opt = getattr(updates, rule)([a], 0.1)
    check_fails(opt, lambda: opt.add_param_group({"params": [b], key: value}), ValueError, rf"\['{key}'\]")


def test_group_keys_torch_and_schedulers_add_are_taken():
    a = torch.zeros(2, requires_grad=True)
    opt = updates.adam([{"params": [a], "initial_lr": 0.1, "betas": (0.8, 0.9)}], 0.1)
    assert opt.param_groups[0]["beta1"] == 0.8
    torch.optim.lr_scheduler.StepLR(opt, 3, last_epoch=0)  # needs initial_lr


@pytest.mark.parametrize("rule", ["sgd", "adam", "rmsprop"])
def test_momentum_in_a_group_of_a_rule_without_momentum_is_refused_at_once(rule):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    message = rf"param group 1 has unknown key\(s\) \['momentum'\]: {rule} takes .*apply_momentum"
    with pytest.raises(ValueError, match=message):
        getattr(updates, rule)([{"params": [a]}, {"params": [b], "momentum": 0.9}], 0.1)
    opt = getattr(updates, rule)([a], 0.1)
    check_fails(opt, lambda: opt.add_param_group({"params": [b], "momentum": 0.9}), ValueError, message)
    composed = updates.apply_momentum(opt)  # its groups do take a momentum
    composed.add_param_group({"params": [b], "momentum": 0.3})
    assert [group["momentum"] for group in composed.param_groups] == [0.9, 0.3]


@pytest.mark.parametrize("rule", ["momentum", "nesterov_momentum"])
def test_momentum_in_a_group_of_the_momentum_rules(rule):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = getattr(updates, rule)([{"params": [a], "momentum": 0.5}, {"params": [b]}], 0.1)
    assert [group["momentum"] for group in opt.param_groups] == [0.5, 0.9]
    with pytest.raises(ValueError, match=r"param group 0: momentum must be in \[0, 1\), got 1.5"):
        getattr(updates, rule)([{"params": [a], "momentum": 1.5}], 0.1)
    # the key of a second modifier, which these rules do not compose
    with pytest.raises(ValueError, match=r"param group 0 has unknown key\(s\) \['momentum_2'\]"):
        getattr(updates, rule)([{"params": [a], "momentum_2": 0.5}], 0.1)


# --- 7b. a failed step leaves "betas" and beta1/beta2 as the user set them ------------------


@pytest.mark.parametrize("call", ["step", "updates"])
@pytest.mark.parametrize(
    ("key", "value", "culprit"),
    [("betas", (0.5, 1.5), "beta2"), ("beta1", 1.5, "beta1"), ("betas", (-0.1, 0.9), "beta1")],
)
def test_a_failed_step_does_not_reconcile_betas(call, key, value, culprit):
    """Before the fix the step made the two sides agree and then failed its checks: the sides
    were written, and the memory of the last pair moved to the refused values."""
    setup = Trained(rule="amsgrad")
    opt = setup.opt
    opt.param_groups[0]["betas"] = (0.6, 0.95)  # a valid change in group 0, before group 1's bad one
    opt.param_groups[1][key] = value
    check_fails(opt, lambda: getattr(opt, call)(setup.grads()), ValueError, rf"{culprit} must be in \[0, 1\)")
    assert opt.param_groups[0]["beta1"] == 0.9 and opt.param_groups[0]["betas"] == (0.6, 0.95)
    # Setting the same side again to a valid value repairs the group; the other side follows.
    opt.param_groups[1][key] = (0.8, 0.99) if key == "betas" else 0.8
    opt.step(setup.grads())
    assert opt.param_groups[0]["beta1"] == 0.6 and opt.param_groups[0]["beta2"] == 0.95
    group = opt.param_groups[1]
    assert group["betas"] == (group["beta1"], group["beta2"]) == ((0.8, 0.99) if key == "betas" else (0.8, 0.999))


def test_a_failed_step_leaves_a_conflict_between_groups_unwritten():
    setup = Trained(rule="adam")
    opt = setup.opt
    opt.param_groups[0]["betas"] = (0.6, 0.95)
    opt.param_groups[1]["beta1"], opt.param_groups[1]["betas"] = 0.5, (0.7, 0.999)  # both sides: refused
    check_fails(opt, lambda: opt.step(setup.grads()), ValueError, r"param group 1: betas=\(0.7, 0.999\).*both changed")
    assert opt.param_groups[0]["beta1"] == 0.9


# --- 8. sets, and non-leaf tensors appended after construction ------------------------------


def test_sets_of_parameters_are_rejected():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"ordered collection \(a list\), not a set"):
        updates.adam({a, b})
    with pytest.raises(TypeError, match=r"ordered collection \(a list\), not a frozenset"):
        updates.adam(frozenset({a, b}))
    with pytest.raises(TypeError, match=r"param group 1: .*ordered collection \(a list\), not a set"):
        updates.adam([{"params": [a]}, {"params": {b}}])


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (lambda s: s.w * 2, ValueError, r"parameter 3 .* is not a leaf"),
        (lambda s: 3.0, TypeError, r"parameter 3 must be a torch.Tensor, got float"),
        (lambda s: torch.zeros(2, dtype=torch.int64), TypeError, r"parameter 3 .* must be floating point"),
    ],
    ids=["non-leaf", "float", "integer tensor"],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_bad_parameter_appended_after_construction(engine, bad, exc, match):
    setup = Trained(engine)
    for p, g in zip(setup.params, setup.grads(), strict=True):
        p.grad = g
    setup.opt.step()  # the compiled engine's steady state, then the change
    setup.opt.param_groups[1]["params"].append(bad(setup))
    check_fails(setup.opt, lambda: setup.opt.step(), exc, match)


# --- 9. named parameters --------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_named_parameters_as_torch_takes_them(engine):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    named = updates.adam(model.named_parameters(), 0.01, engine=engine)
    plain = updates.adam(twin.parameters(), 0.01, engine=engine)
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    assert "param_names" not in plain.param_groups[0]
    x = torch.randn(5, 3)
    for _ in range(2):
        named.step(model(x).square().sum())
        plain.step(twin(x).square().sum())
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    saved = copy.deepcopy(named.state_dict())
    reference = torch.optim.Adam(torch.nn.Linear(3, 2).named_parameters()).state_dict()
    assert saved["param_groups"][0]["param_names"] == reference["param_groups"][0]["param_names"]
    named.load_state_dict(saved)
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]


def test_named_parameters_in_groups_and_mixed():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    groups = [{"params": model[0].named_parameters()}, {"params": model[1].named_parameters(), "lr": 0.1}]
    opt = updates.apply_momentum(updates.rmsprop(groups, 0.01))
    assert [g["param_names"] for g in opt.param_groups] == [["weight", "bias"], ["weight", "bias"]]
    with pytest.raises(ValueError, match=r"parameter 1 has no name but others do"):
        updates.adam([("w", model[0].weight), model[0].bias])
    with pytest.raises(ValueError, match=r"with/without names"):
        updates.adam([{"params": model[0].named_parameters()}, {"params": model[1].parameters()}])


# --- 10 is test_state_dtype_is_recorded_and_never_narrowed_on_load above --------------------


# --- property: random chains ----------------------------------------------------------------

RULES = {
    "sgd": {"learning_rate": st.floats(0.0, 1.0)},
    "adagrad": {"learning_rate": st.floats(0.0, 1.0), "epsilon": st.floats(1e-8, 1e-2)},
    "rmsprop": {"learning_rate": st.floats(0.0, 1.0), "rho": st.floats(0.0, 0.99)},
    "adadelta": {"learning_rate": st.floats(0.0, 2.0), "rho": st.floats(0.0, 0.99)},
    "adam": {"learning_rate": st.floats(0.0, 0.1), "beta1": st.floats(0.0, 0.99), "beta2": st.floats(0.0, 0.999)},
    "adamax": {"learning_rate": st.floats(0.0, 0.1), "beta1": st.floats(0.0, 0.99)},
    "amsgrad": {"learning_rate": st.floats(0.0, 0.1), "beta2": st.floats(0.0, 0.999)},
}
SHAPES = [(), (0,), (3,), (2, 3), (0, 4), (1, 2, 2)]


@st.composite
def problems(draw):
    rule = draw(st.sampled_from(sorted(RULES)))
    hyper = {name: draw(strategy) for name, strategy in RULES[rule].items()}
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    modifiers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["apply_momentum", "apply_nesterov_momentum"]),
                st.floats(0.0, 0.99),
                st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
            ),
            max_size=2,
        )
    )
    seed = draw(st.integers(0, 2**16))
    return rule, hyper, dtype, shapes, modifiers, seed


def _build(problem, engine):
    rule, hyper, dtype, shapes, modifiers, seed = problem
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    opt = getattr(updates, rule)(params, engine=engine, **hyper)
    for name, momentum, subset in modifiers:
        members = [p for p, keep in zip(params, subset, strict=True) if keep]
        opt = getattr(updates, name)(opt, params=members if members else None, momentum=momentum)
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(3)]
    return params, opt, grads


def _everything(params, opt):
    return [p.detach() for p in params] + [v for p in params for _, v in sorted(opt.state[p].items())]


@settings(max_examples=25, deadline=None)
@given(problems())
def test_random_chains_agree_across_engines_and_with_the_update_dictionary(problem):
    runs = {}
    for engine, how in [("foreach", "step"), ("reference", "step"), ("foreach", "apply")]:
        params, opt, grads = _build(problem, engine)
        for g in grads:
            if how == "step":
                opt.step(g)
            else:
                updates.apply_updates(opt.updates(g))
        runs[engine, how] = _everything(params, opt)
    first = runs["foreach", "step"]
    for key, values in runs.items():
        assert len(values) == len(first)
        for a, b in zip(first, values, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), key
    for value in first:
        if value.is_floating_point():
            assert torch.isfinite(value).all()


# --- gradients that are the memory of what the step writes --------------------------------------


def _aliased_steps(engine, mode, aliasing):
    """Three steps of momentum in two param groups whose gradients are the memory of what the
    step writes; ``mode``: ``step`` or ``updates`` (apply_updates of the update dictionary)."""
    a = torch.nn.Parameter(torch.full((3, 4), 1.0))
    b = torch.nn.Parameter(torch.full((3, 4), 2.0))
    c = torch.nn.Parameter(torch.full((5,), 3.0))
    opt = updates.momentum(
        [{"params": [b, c]}, {"params": [a], "learning_rate": 0.5}], learning_rate=0.1, momentum=0.5, engine=engine
    )
    for _ in range(3):
        if aliasing == ".grad is another group's parameter":
            b.grad, c.grad, a.grad = torch.ones(3, 4), torch.ones(5), b.detach()
            grads = None
        elif aliasing == "listed gradients are the parameters":
            grads = [a.detach(), c.detach(), b.detach()]  # b's is a, a's is b
        else:  # a gradient is another group's state
            velocity = opt.state[b].get("velocity", torch.zeros(3, 4))
            grads = [torch.ones(3, 4), torch.ones(5), velocity]
        if mode == "step":
            opt.step(grads)
        else:
            updates.apply_updates(opt.updates(grads))
    return [t.detach().clone() for t in (a, b, c)] + [opt.state[p]["velocity"].clone() for p in (a, b, c)]


ALIASING = [".grad is another group's parameter", "listed gradients are the parameters", "a gradient is a state"]


@pytest.mark.parametrize("aliasing", ALIASING)
@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_are_read_before_the_step_writes(engine, aliasing):
    # step(x) == apply_updates(updates(x)) holds when a gradient is the memory of a parameter
    # or a state tensor, also of another param group, which an engine writes first: every
    # gradient is read as it was before the step.
    stepped, applied = _aliased_steps(engine, "step", aliasing), _aliased_steps(engine, "updates", aliasing)
    for x, y in zip(stepped, applied, strict=True):
        assert torch.equal(x, y)


def test_gradient_of_another_groups_parameter_by_hand():
    # The first case by hand (float32 NumPy): b steps with gradient 1 (velocity v_b), a with
    # gradient b as it was before the step.
    f32 = np.float32
    a, b, va, vb = f32(1.0), f32(2.0), f32(0.0), f32(0.0)
    for _ in range(3):
        grad_a = b
        for name in ("b", "a"):
            p, v, lr, g = (b, vb, f32(0.1), f32(1.0)) if name == "b" else (a, va, f32(0.5), grad_a)
            x = f32(f32(0.5) * v) + f32(p - f32(lr * g))
            v, p = f32(x - p), x
            if name == "b":
                b, vb = p, v
            else:
                a, va = p, v
    stepped = _aliased_steps("foreach", "step", ALIASING[0])
    assert stepped[0][0, 0].item() == a and stepped[1][0, 0].item() == b
