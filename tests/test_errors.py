"""Bad inputs get a clear ValueError/TypeError naming the problem (docs/design.md, section 2, "Errors"),
and a failed step writes nothing: every parameter and state tensor stays bitwise as it was."""

from __future__ import annotations

import copy

import pytest
import torch

import torchupdates as updates
from compiler import needs_compiler
from torchupdates.registry import RULE_NAMES as RULES

DECAYS = {
    "momentum": ["momentum"],
    "nesterov_momentum": ["momentum"],
    "rmsprop": ["rho"],
    "adadelta": ["rho"],
    "adam": ["beta1", "beta2"],
    "adamax": ["beta1", "beta2"],
    "amsgrad": ["beta1", "beta2"],
}
WITH_EPSILON = ["adagrad", "rmsprop", "adadelta", "adam", "adamax", "amsgrad"]


def make_rule(name, params, **kwargs):
    kwargs.setdefault("learning_rate", 0.05)
    return getattr(updates, name)(params, **kwargs)


# --- snapshot of everything a step may write ------------------------------------------------


def snapshot(opt):
    params = [p for group in opt.param_groups for p in group["params"]]
    return {
        "params": [(p, p.detach().clone()) for p in params],
        "state": {
            id(p): {k: (v, v.clone()) if isinstance(v, torch.Tensor) else (v, copy.deepcopy(v)) for k, v in s.items()}
            for p, s in opt.state.items()
        },
        "n_groups": len(opt.param_groups),
    }


def assert_unchanged(opt, snap):
    for param, saved in snap["params"]:
        assert param.dtype == saved.dtype
        assert torch.equal(param.detach(), saved), "a parameter was written by a failed step"
    current = {id(p): s for p, s in opt.state.items() if len(s) > 0}
    saved_nonempty = {k: v for k, v in snap["state"].items() if len(v) > 0}
    assert current.keys() == saved_nonempty.keys(), "a failed step created or dropped state"
    for pid, entries in saved_nonempty.items():
        assert current[pid].keys() == entries.keys()
        for key, (obj, saved) in entries.items():
            now = current[pid][key]
            if isinstance(saved, torch.Tensor):
                assert now is obj, f"state tensor {key!r} was replaced"
                assert now.dtype == saved.dtype
                assert torch.equal(now, saved), f"state tensor {key!r} was written by a failed step"
            else:
                assert now == saved
    assert len(opt.param_groups) == snap["n_groups"]


# --- a trained optimizer with non-trivial state -------------------------------------------


class Setup:
    """adam on a matrix, a vector (second group) and a complex tensor, then momentum on two of
    them, stepped twice; then one more parameter added without any state yet."""

    def __init__(self, engine="foreach", lr=0.01):
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 4, generator=gen).requires_grad_()
        self.b = torch.randn(4, generator=gen).requires_grad_()
        self.z = torch.randn(2, dtype=torch.complex64, generator=gen).requires_grad_()
        self.late = torch.randn(2, generator=gen).requires_grad_()
        base = updates.adam([{"params": [self.w, self.z]}, {"params": [self.b], "beta1": 0.5}], lr, engine=engine)
        self.opt = updates.apply_momentum(base, params=[self.w, self.b], momentum=0.5)
        for _ in range(2):
            self.opt.step(self.loss())
        self.opt.add_param_group({"params": [self.late], "lr": 0.1})
        self.params = [self.w, self.z, self.b, self.late]
        assert int(self.opt.state[self.w]["step"]) == 2
        assert "velocity" in self.opt.state[self.b]

    def loss(self, late=False):
        value = (self.w**2).sum() + (self.w.sum(1) * 0.3).sum() + (self.b**3).sum() + (self.z.abs() ** 2).sum()
        return value + (self.late**2).sum() if late else value

    def grads(self):
        return [torch.ones_like(p) for p in self.params]


def _replace(grads, index, value):
    grads = list(grads)
    grads[index] = value
    return grads


# each case: (id, action(setup), exception type, message pattern)
STEP_FAILURES = [
    ("too few gradients", lambda s: s.opt.step(s.grads()[:-1]), ValueError, r"3 gradients for 4 parameters"),
    ("too many gradients", lambda s: s.opt.step([*s.grads(), torch.ones(1)]), ValueError, r"5 gradients for 4"),
    ("non-scalar loss", lambda s: s.opt.step(s.w * 2), ValueError, r"scalar"),
    ("non-scalar loss via updates()", lambda s: s.opt.updates((s.w * 2).sum(0)), ValueError, r"scalar"),
    ("loss ignores a parameter", lambda s: s.opt.step(s.loss()), ValueError, r"does not depend on parameter 3"),
    ("loss does not require grad", lambda s: s.opt.step(torch.tensor(1.0)), ValueError, r"does not require grad"),
    ("complex loss", lambda s: s.opt.step((s.z**2).sum()), TypeError, r"real"),
    (
        "sparse gradient on adam",
        lambda s: s.opt.step(_replace(s.grads(), 0, torch.ones(3, 4).to_sparse())),
        TypeError,
        r"sparse",
    ),
    (
        "complex parameter, real gradient",
        lambda s: s.opt.step(_replace(s.grads(), 1, torch.ones(2))),
        TypeError,
        r"complex.*real",
    ),
    (
        "real parameter, complex gradient",
        lambda s: s.opt.step(_replace(s.grads(), 0, torch.ones(3, 4, dtype=torch.complex64))),
        TypeError,
        r"real.*complex",
    ),
    (
        "gradient of wrong shape (last parameter)",
        lambda s: s.opt.step(_replace(s.grads(), 3, torch.ones(3))),
        ValueError,
        r"shape \(3,\)",
    ),
    (
        "gradient of wrong dtype",
        lambda s: s.opt.step(_replace(s.grads(), 2, torch.ones(4, dtype=torch.float64))),
        TypeError,
        r"dtype",
    ),
    ("gradient not a tensor", lambda s: s.opt.step(_replace(s.grads(), 2, [1.0] * 4)), TypeError, r"tensor"),
    ("loss_or_grads of a wrong type", lambda s: s.opt.step("loss"), TypeError, r"loss_or_grads"),
    ("unknown engine set later", lambda s: (setattr(s.opt, "engine", "fused"), s.opt.step()), ValueError, r"engine"),
]


def _set_group(index, key, value):
    def action(s):
        s.opt.param_groups[index][key] = value
        s.opt.step(s.grads())

    return action


GROUP_FAILURES = [
    ("negative lr set in group", _set_group(0, "lr", -1.0), ValueError, r"learning_rate.*>= 0"),
    ("negative lr in late group", _set_group(2, "lr", -1e-3), ValueError, r"param group 2.*learning_rate"),
    ("beta1 = 1 set in group", _set_group(1, "beta1", 1.0), ValueError, r"beta1.*\[0, 1\)"),
    ("beta2 < 0 set in group", _set_group(0, "beta2", -0.5), ValueError, r"beta2"),
    ("learning_rate set in group", _set_group(0, "learning_rate", 0.5), ValueError, r"kept as .lr."),
    ("momentum = 1 set in group", _set_group(0, "momentum", 1.0), ValueError, r"momentum"),
    ("negative epsilon set in group", _set_group(0, "epsilon", -1e-8), ValueError, r"epsilon.*>= 0"),
    ("nan lr set in group", _set_group(0, "lr", float("nan")), ValueError, r"learning_rate"),
    ("1-d tensor lr set in group", _set_group(0, "lr", torch.tensor([0.1])), ValueError, r"0-d"),
    ("string lr set in group", _set_group(0, "lr", "0.1"), TypeError, r"learning_rate"),
]


@pytest.mark.parametrize(
    ("action", "exc", "match"),
    [pytest.param(a, e, m, id=i) for i, a, e, m in STEP_FAILURES + GROUP_FAILURES],
)
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_failed_step_raises_and_writes_nothing(action, exc, match, engine):
    setup = Setup(engine)
    for p in setup.params:
        p.grad = torch.ones_like(p)  # a failed step must also not fall back to .grad
    snap = snapshot(setup.opt)
    with pytest.raises(exc, match=match):
        action(setup)
    assert_unchanged(setup.opt, snap)


@pytest.mark.parametrize("engine", ["reference", "foreach", pytest.param("compiled", marks=needs_compiler)])
def test_parameter_reshaped_after_its_state_was_made_fails_the_step(engine):
    # p.data replaced by a tensor of another shape after the first steps (the same number of
    # elements, so nothing else notices): a clear error naming the state and both shapes,
    # raised before anything is written.
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt = updates.apply_momentum(updates.adam([w, b], 0.1, engine=engine))
    for _ in range(2):
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
    w.data = torch.randn(3, 4)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=r"state 'm' of parameter 0 .*has shape \(4, 3\).*parameter \(3, 4\)"):
        opt.step()
    assert_unchanged(opt, snap)


def test_tensor_hyperparameter_made_invalid_in_place_fails_the_step():
    eta = torch.tensor(0.01)
    setup = Setup(lr=eta)
    snap = snapshot(setup.opt)
    eta.fill_(-0.5)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0, got -0.5"):
        setup.opt.step(setup.grads())
    assert_unchanged(setup.opt, snap)
    eta.fill_(0.01)  # and it recovers
    setup.opt.step(setup.grads())
    assert int(setup.opt.state[setup.w]["step"]) == 3


def test_failed_closure_step_writes_nothing():
    setup = Setup()
    snap = snapshot(setup.opt)

    def closure():
        setup.opt.zero_grad()
        loss = setup.loss()
        loss.backward()
        setup.w.grad = setup.w.grad.to_sparse()  # adam cannot take it
        return loss

    with pytest.raises(TypeError, match=r"sparse"):
        setup.opt.step(closure)
    assert_unchanged(setup.opt, snap)


# --- construction-time errors ---------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
def test_non_leaf_parameter(name):
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"not a leaf"):
        make_rule(name, [w * 2])


@pytest.mark.parametrize("bad", [1.0, [1.0, 2.0], "w", None])
def test_non_tensor_parameter(bad):
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"parameter 1 must be a torch.Tensor"):
        updates.sgd([w, bad], 0.1)


def test_integer_parameter():
    with pytest.raises(TypeError, match=r"floating point or complex"):
        updates.sgd([torch.zeros(3, dtype=torch.int64)], 0.1)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("value", [-1e-3, -1.0, float("-inf"), float("nan")])
def test_negative_learning_rate(name, value):
    with pytest.raises(ValueError, match=r"learning_rate"):
        make_rule(name, [torch.zeros(2, requires_grad=True)], learning_rate=value)
    with pytest.raises(ValueError, match=r"learning_rate"):
        make_rule(name, [torch.zeros(2, requires_grad=True)], learning_rate=torch.tensor(value))


@pytest.mark.parametrize(
    ("name", "key"), [(name, key) for name, keys in DECAYS.items() for key in keys], ids=lambda x: str(x)
)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_decay_outside_unit_interval(name, key, value):
    with pytest.raises(ValueError, match=rf"{key} must be in \[0, 1\)"):
        make_rule(name, [torch.zeros(2, requires_grad=True)], **{key: value})


@pytest.mark.parametrize("name", WITH_EPSILON)
def test_negative_epsilon(name):
    with pytest.raises(ValueError, match=r"epsilon must be >= 0"):
        make_rule(name, [torch.zeros(2, requires_grad=True)], epsilon=-1e-8)


@pytest.mark.parametrize("modifier", ["apply_momentum", "apply_nesterov_momentum"])
@pytest.mark.parametrize("value", [-0.5, 1.0, 2.0])
def test_modifier_momentum_out_of_range(modifier, value):
    opt = updates.sgd([torch.zeros(2, requires_grad=True)], 0.1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        getattr(updates, modifier)(opt, momentum=value)


@pytest.mark.parametrize("shape", [(1,), (2, 2), (3,)])
def test_non_0d_tensor_hyperparameter(shape):
    with pytest.raises(ValueError, match=r"0-d tensor.*shape"):
        updates.adam([torch.zeros(2, requires_grad=True)], torch.full(shape, 0.1))
    with pytest.raises(ValueError, match=r"beta1.*0-d tensor"):
        updates.adam([torch.zeros(2, requires_grad=True)], beta1=torch.full(shape, 0.9))


def test_other_bad_hyperparameter_types():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=r"learning_rate"):
        updates.sgd(p, "0.1")
    with pytest.raises(TypeError, match=r"learning_rate"):
        updates.sgd(p, True)
    with pytest.raises(TypeError, match=r"learning_rate.*floating"):
        updates.sgd(p, torch.tensor(1))
    with pytest.raises(ValueError, match=r"learning_rate.*grad"):
        updates.sgd(p, torch.tensor(0.1, requires_grad=True))


def test_bad_hyperparameter_in_param_group_at_construction():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"param group 1.*rho"):
        updates.rmsprop([{"params": [a]}, {"params": [b], "rho": 1.0}])
    with pytest.raises(ValueError, match=r"both 'learning_rate' and 'lr'"):
        updates.sgd([{"params": [a], "learning_rate": 0.1, "lr": 0.2}], 0.1)


def test_add_param_group_failures_add_nothing():
    a = torch.zeros(2, requires_grad=True)
    opt = updates.adam([a])
    opt.step([torch.ones(2)])
    snap = snapshot(opt)
    new = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"beta2"):
        opt.add_param_group({"params": [new], "beta2": 1.0})
    with pytest.raises(ValueError, match=r"learning_rate"):
        opt.add_param_group({"params": [new], "learning_rate": -1.0})
    with pytest.raises(ValueError, match=r"not a leaf"):
        opt.add_param_group({"params": [new * 2]})
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        opt.add_param_group({"params": [new, 3.0]})
    with pytest.raises(ValueError, match=r"more than one"):
        opt.add_param_group({"params": [a]})
    assert_unchanged(opt, snap)
    opt.step([torch.ones(2)])  # still usable


@pytest.mark.parametrize("engine", ["fused", "compiled-typo", ""])
def test_unknown_engine(engine):
    with pytest.raises(ValueError, match=r"unknown engine"):
        updates.adam([torch.zeros(2, requires_grad=True)], engine=engine)


def test_bad_state_dtype():
    with pytest.raises(TypeError, match=r"state_dtype"):
        updates.adam([torch.zeros(2, requires_grad=True)], state_dtype=torch.int32)


def test_unknown_or_missing_hyperparameter():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=r"unknown hyperparameter.*rho"):
        updates.Optimizer(p, updates.rules.ADAM, rho=0.5)
    with pytest.raises(TypeError, match=r"missing required hyperparameter 'learning_rate'"):
        updates.Optimizer(p, updates.rules.SGD)


# --- modifiers ------------------------------------------------------------------------------


@pytest.mark.parametrize("modifier", ["apply_momentum", "apply_nesterov_momentum"])
@pytest.mark.parametrize(
    "foreign",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.Adam(ps),
        lambda ps: ps,
    ],
    ids=["torch SGD", "torch Adam", "a list"],
)
def test_modifier_on_a_non_torchupdates_optimizer(modifier, foreign):
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match=r"torchupdates Optimizer"):
        getattr(updates, modifier)(foreign(params))


@pytest.mark.parametrize("modifier", ["apply_momentum", "apply_nesterov_momentum"])
def test_modifier_with_params_not_in_the_optimizer(modifier):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(5, 3, requires_grad=True)
    opt = updates.adam([a])
    with pytest.raises(ValueError, match=rf"{modifier}: a parameter \(\(5, 3\)\) is not optimized"):
        getattr(updates, modifier)(opt, params=[a, b])
    # a copy with the same values is still a different tensor
    with pytest.raises(ValueError, match=r"not optimized"):
        getattr(updates, modifier)(opt, params=[a.detach().clone().requires_grad_()])


# --- constraints ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(), (7,), (2, 2, 2, 2, 2, 2)])
def test_norm_constraint_unsupported_dimensionality(shape):
    with pytest.raises(ValueError, match=rf"Unsupported tensor dimensionality {len(shape)}"):
        updates.norm_constraint(torch.ones(shape), 1.0)
    # giving the axes makes it work (0-d has no axis to give)
    if shape:
        updates.norm_constraint(torch.ones(shape), 1.0, norm_axes=tuple(range(len(shape))))


def test_norm_constraint_bad_arguments():
    x = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"max_norm must be >= 0"):
        updates.norm_constraint(x, -1.0)
    with pytest.raises(ValueError, match=r"epsilon must be >= 0"):
        updates.norm_constraint(x, 1.0, epsilon=-1e-7)
    with pytest.raises(ValueError, match=r"norm_axes entry 2"):
        updates.norm_constraint(x, 1.0, norm_axes=(2,))
    with pytest.raises(ValueError, match=r"repeats"):
        updates.norm_constraint(x, 1.0, norm_axes=(1, -1))
    with pytest.raises(TypeError, match=r"floating point"):
        updates.norm_constraint(torch.ones(3, 4, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        updates.norm_constraint([[1.0, 2.0]], 1.0)


def test_total_norm_constraint_bad_arguments():
    with pytest.raises(ValueError, match=r"at least one"):
        updates.total_norm_constraint([], 1.0)
    with pytest.raises(ValueError, match=r"max_norm"):
        updates.total_norm_constraint([torch.ones(2)], -2.0)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        updates.total_norm_constraint([torch.ones(2), 3.0], 1.0)


# --- apply_updates --------------------------------------------------------------------------


def test_apply_updates_with_a_mismatched_shape_writes_nothing():
    setup = Setup()
    upd = setup.opt.updates(setup.loss(late=True))
    snap = snapshot(setup.opt)
    upd[setup.b] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"shape \(5,\) cannot be written to a tensor of shape \(4,\)"):
        updates.apply_updates(upd)
    assert_unchanged(setup.opt, snap)


def test_apply_updates_with_a_non_tensor_writes_nothing():
    a, b = torch.zeros(2), torch.zeros(2)
    with pytest.raises(TypeError, match=r"tensors to tensors"):
        updates.apply_updates({a: torch.ones(2), b: [1.0, 1.0]})
    assert not a.any() and not b.any()


# --- get_or_compute_grads -------------------------------------------------------------------


def test_get_or_compute_grads_errors():
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"got 1 gradients for 2 parameters"):
        updates.get_or_compute_grads([torch.ones(3)], [a, b])
    with pytest.raises(ValueError, match=r"scalar"):
        updates.get_or_compute_grads(a * 2, [a])
    with pytest.raises(ValueError, match=r"does not depend on parameter 1"):
        updates.get_or_compute_grads((a**2).sum(), [a, b])
    with pytest.raises(ValueError, match=r"not a leaf"):
        updates.get_or_compute_grads((a**2).sum(), [a * 2])
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        updates.get_or_compute_grads((a**2).sum(), [a, 1.0])
    with pytest.raises(TypeError, match=r"loss_or_grads"):
        updates.get_or_compute_grads(3.0, [a])
    assert a.grad is None


# --- load_state_dict from a different optimizer --------------------------------------------


def _trained(build):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))
    opt = build([p])
    for _ in range(2):
        opt.step((p**2).sum())
    return copy.deepcopy(opt.state_dict())


LOAD_MISMATCHES = [
    ("adam into rmsprop", lambda ps: updates.adam(ps), lambda ps: updates.rmsprop(ps)),
    ("adam into adamax", lambda ps: updates.adam(ps), lambda ps: updates.adamax(ps)),
    ("rmsprop into adadelta", lambda ps: updates.rmsprop(ps), lambda ps: updates.adadelta(ps)),
    ("momentum into adagrad", lambda ps: updates.momentum(ps, 0.1), lambda ps: updates.adagrad(ps)),
    # the saved state is a subset of what the target keeps, but the rule (and its groups) differ
    ("sgd into adam", lambda ps: updates.sgd(ps, 0.1), lambda ps: updates.adam(ps)),
    ("adam into amsgrad", lambda ps: updates.adam(ps), lambda ps: updates.amsgrad(ps)),
    (
        "adam into apply_momentum(adam)",
        lambda ps: updates.adam(ps),
        lambda ps: updates.apply_momentum(updates.adam(ps)),
    ),
]


@pytest.mark.parametrize(("source", "target"), [pytest.param(s, t, id=i) for i, s, t in LOAD_MISMATCHES])
def test_load_state_dict_from_a_different_rule(source, target):
    saved = _trained(source)
    q = torch.nn.Parameter(torch.linspace(-1, 1, 6).reshape(2, 3))
    opt = target([q])
    opt.step((q**2).sum())
    snap = snapshot(opt)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=r"another rule|different rule|saved from"):
        opt.load_state_dict(saved)
    assert_unchanged(opt, snap)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    opt.step((q**2).sum())  # still usable


def test_load_state_dict_not_a_state_dict():
    opt = updates.adam([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=r"not an optimizer state dict"):
        opt.load_state_dict({"m": torch.zeros(2)})
