"""The torch.optim side of the contract (docs/design.md, section 2): stepping, groups, checkpoints,
schedulers, tensor hyperparameters, hooks, dtypes, complex and sparse parameters.

Reference values come from hand calculations in float64 written here, from the formulas of
docs/design.md, section 3 "The math", or from a second run of the optimizer that must agree bit for bit.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import torchupdates as updates
from torchupdates.registry import RULE_NAMES as RULES

# Every hyperparameter of every rule (beyond learning_rate), with a valid non-default value.
OVERRIDES = {
    "sgd": {},
    "momentum": {"momentum": 0.5},
    "nesterov_momentum": {"momentum": 0.5},
    "adagrad": {"epsilon": 1e-2},
    "rmsprop": {"rho": 0.5, "epsilon": 1e-2},
    "adadelta": {"rho": 0.5, "epsilon": 1e-2},
    "adam": {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-2},
    "adamax": {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-2},
    "amsgrad": {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-2},
}

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def make_rule(name, params, **kwargs):
    kwargs.setdefault("learning_rate", 0.05)
    return getattr(updates, name)(params, **kwargs)


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def make_grads(n_steps, dtype=torch.float64, seed=1, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(n_steps)]


def clones(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        assert a.shape == e.shape
        assert torch.equal(a.detach(), e.detach()), (a, e)


def state_of(opt, params):
    """The state tensors of each parameter, in parameter order, as (key, tensor) lists."""
    return [sorted(opt.state[p].items()) for p in params]


def assert_same_state(opt_a, params_a, opt_b, params_b):
    for sa, sb in zip(state_of(opt_a, params_a), state_of(opt_b, params_b), strict=True):
        assert [k for k, _ in sa] == [k for k, _ in sb]
        assert_bitwise([v for _, v in sa], [v for _, v in sb])


# --- the class --------------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
def test_every_rule_is_a_torch_optimizer(name):
    opt = make_rule(name, make_params())
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, updates.Optimizer)
    assert opt.rule_name == {
        "momentum": "apply_momentum(sgd)",
        "nesterov_momentum": "apply_nesterov_momentum(sgd)",
    }.get(name, name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adagrad", {"lr": 1.0, "epsilon": 1e-6}),
        ("rmsprop", {"lr": 1.0, "rho": 0.9, "epsilon": 1e-6}),
        ("adadelta", {"lr": 1.0, "rho": 0.95, "epsilon": 1e-6}),
        # the Adam family also keeps torch's "betas" pair, for momentum-cycling schedulers
        ("adam", {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "betas": (0.9, 0.999)}),
        ("adamax", {"lr": 0.002, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "betas": (0.9, 0.999)}),
        ("amsgrad", {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "betas": (0.9, 0.999)}),
    ],
)
def test_defaults_are_the_seeds_and_lr_is_stored_under_lr(name, expected):
    opt = getattr(updates, name)(make_params())
    assert opt.defaults == expected
    group = opt.param_groups[0]
    assert {k: v for k, v in group.items() if k != "params"} == expected
    assert "learning_rate" not in group


def test_momentum_defaults():
    assert updates.momentum(make_params(), 0.1).defaults == {"lr": 0.1, "momentum": 0.9}
    assert updates.nesterov_momentum(make_params(), 0.1).defaults == {"lr": 0.1, "momentum": 0.9}
    assert updates.apply_momentum(updates.adam(make_params())).defaults["momentum"] == 0.9


# --- the four ways to step ----------------------------------------------------------------


def _loss(params):
    return sum(((i + 1) * p**2).sum() + p.sum() for i, p in enumerate(params))


def _analytic_grads(params):
    return [(2 * (i + 1)) * p.detach() + 1 for i, p in enumerate(params)]


def test_step_with_scalar_loss_sgd_hand_computed():
    params = make_params()
    before = clones(params)
    opt = updates.sgd(params, 0.1)
    loss = _loss(params)
    returned = opt.step(loss)
    assert returned is loss
    for p, b, g in zip(params, before, _analytic_grads(before), strict=True):
        torch.testing.assert_close(p.detach(), b.detach() - 0.1 * g, rtol=1e-14, atol=1e-14)
        assert p.grad is None  # a loss goes through torch.autograd.grad, .grad is untouched


@pytest.mark.parametrize("container", [list, tuple])
def test_step_with_list_of_grads_equals_loss(container):
    a, b = make_params(), make_params()
    opt_a, opt_b = updates.adam(a, 0.1), updates.adam(b, 0.1)
    for _ in range(3):
        opt_a.step(_loss(a))
        assert opt_b.step(container(_analytic_grads(b))) is None
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_step_none_uses_dot_grad():
    params = make_params()
    before = clones(params)
    opt = updates.sgd(params, 0.25)
    _loss(params).backward()
    grads = [p.grad.clone() for p in params]
    assert opt.step() is None
    for p, b, g in zip(params, before, grads, strict=True):
        assert torch.equal(p.detach(), b.detach() - 0.25 * g)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_step_with_closure_returns_loss_and_steps_from_grad(by_keyword):
    params = make_params()
    reference = clones(params)
    opt = updates.rmsprop(params, 0.01)
    ref_opt = updates.rmsprop(reference, 0.01)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    for _ in range(3):
        expected_loss = _loss(params).detach()
        # torch.optim convention: the closure re-enables grad itself, step may run under no_grad
        with torch.no_grad():
            returned = opt.step(closure=closure) if by_keyword else opt.step(closure)
        assert isinstance(returned, torch.Tensor)
        assert torch.equal(returned.detach(), expected_loss)
        ref_opt.step(_analytic_grads(reference))
    assert len(calls) == 3
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def test_closure_by_keyword_in_updates_and_not_beside_gradients():
    params = make_params()
    opt = updates.adam(params, 0.01)

    def closure():
        opt.zero_grad()
        loss = _loss(params)
        loss.backward()
        return loss

    upd = opt.updates(closure=closure)
    grads = [p.grad.clone() for p in params]
    twin = updates.adam(clones(params), 0.01)
    expected = list(twin.updates(grads).values())
    assert all(torch.equal(a, b) for a, b in zip(upd.values(), expected, strict=True))
    with pytest.raises(TypeError, match="either loss_or_grads or closure"):
        opt.step(grads, closure=closure)


def test_zero_grad():
    params = make_params()
    opt = updates.sgd(params, 0.1)
    _loss(params).backward()
    assert all(p.grad is not None for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    _loss(params).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)


def test_updates_writes_nothing_and_step_equals_apply_updates():
    a, b = make_params(), make_params()
    opt_a, opt_b = updates.apply_momentum(updates.adam(a, 0.1)), updates.apply_momentum(updates.adam(b, 0.1))
    for grads in make_grads(3):
        opt_a.step(grads)
        snapshot = clones(b)
        upd = opt_b.updates(grads)
        assert_bitwise(b, snapshot)
        # every parameter and every state tensor is a key
        keys = {id(k) for k in upd}
        for p in b:
            assert id(p) in keys
            for v in opt_b.state[p].values():
                assert id(v) in keys
        updates.apply_updates(upd)
    assert_bitwise(a, b)
    assert_same_state(opt_a, a, opt_b, b)


# --- param groups -------------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("lr_key", ["learning_rate", "lr"])
def test_param_group_overrides_every_hyperparameter(name, lr_key):
    """A group override gives bitwise the same trajectory as a separate optimizer built with that value."""
    overrides = dict(OVERRIDES[name])
    params = make_params()
    first, second = params[:1], params[1:]
    opt = make_rule(name, [{"params": first, lr_key: 0.2, **overrides}, {"params": second}])
    assert opt.param_groups[0]["lr"] == 0.2
    assert lr_key == "lr" or "learning_rate" not in opt.param_groups[0]
    for key, value in overrides.items():
        assert opt.param_groups[0][key] == value
    ref_first, ref_second = clones(first), clones(second)
    ref_opt_first = make_rule(name, ref_first, learning_rate=0.2, **overrides)
    ref_opt_second = make_rule(name, ref_second)
    for grads in make_grads(3):
        opt.step(grads)
        ref_opt_first.step(grads[:1])
        ref_opt_second.step(grads[1:])
    assert_bitwise(first, ref_first)
    assert_bitwise(second, ref_second)


@pytest.mark.parametrize("lr_key", ["learning_rate", "lr"])
def test_add_param_group_later(lr_key):
    params = make_params()
    opt = updates.adam(params[:2], 0.05)
    ref_a = clones(params[:2])
    ref_opt_a = updates.adam(ref_a, 0.05)
    grads = make_grads(4)
    opt.step(grads[0][:2])
    ref_opt_a.step(grads[0][:2])
    opt.add_param_group({"params": [params[2]], lr_key: 0.3, "beta1": 0.5})
    group = opt.param_groups[-1]
    assert group["lr"] == 0.3 and group["beta1"] == 0.5 and group["beta2"] == 0.999
    assert "learning_rate" not in group
    ref_b = clones(params[2:])
    ref_opt_b = updates.adam(ref_b, 0.3, beta1=0.5)
    for g in grads[1:]:
        opt.step(g)
        ref_opt_a.step(g[:2])
        ref_opt_b.step(g[2:])
    assert_bitwise(params, ref_a + ref_b)
    assert int(opt.state[params[0]]["step"]) == 4
    assert int(opt.state[params[2]]["step"]) == 3


def test_double_momentum_gets_its_own_key():
    params = make_params()
    opt = updates.apply_momentum(updates.momentum(params, 0.1, momentum=0.5), momentum=0.25)
    assert opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["momentum_2"] == 0.25
    assert opt.rule_name == "apply_momentum(apply_momentum(sgd))"
    opt.step(make_grads(1)[0])
    assert len([k for k in opt.state[params[0]] if "velocity" in k]) == 2


# --- checkpoints --------------------------------------------------------------------------


def _build(kind, params):
    if kind == "nesterov(adam)":
        return updates.apply_nesterov_momentum(updates.adam(params, 0.01), momentum=0.8)
    if kind == "momentum(rmsprop, subset)":
        return updates.apply_momentum(updates.rmsprop(params, 0.01), params=[params[0], params[2]], momentum=0.7)
    if kind == "groups(amsgrad)":
        return updates.amsgrad([{"params": params[:1], "lr": 0.03, "beta2": 0.9}, {"params": params[1:]}], 0.01)
    return make_rule(kind, params)


CHECKPOINT_KINDS = [*RULES, "nesterov(adam)", "momentum(rmsprop, subset)", "groups(amsgrad)"]


def _save_deepcopy(opt, params):
    return copy.deepcopy({"opt": opt.state_dict(), "params": [p.detach() for p in params]})


def _save_bytesio(opt, params):
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
@pytest.mark.parametrize("save", [_save_deepcopy, _save_bytesio], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_gives_bitwise_exact_continuation(kind, save, dtype):
    n_before, n_after = 3, 3
    grads = make_grads(n_before + n_after, dtype=dtype)
    uninterrupted = make_params(dtype)
    opt = _build(kind, uninterrupted)
    for g in grads:
        opt.step(g)

    first = make_params(dtype)
    opt_first = _build(kind, first)
    for g in grads[:n_before]:
        opt_first.step(g)
    checkpoint = save(opt_first, first)

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    opt_resumed = _build(kind, resumed)
    opt_resumed.load_state_dict(checkpoint["opt"])
    for g in grads[n_before:]:
        opt_resumed.step(g)
        opt_first.step(g)
    assert_bitwise(resumed, uninterrupted)
    assert_bitwise(first, uninterrupted)
    assert_same_state(opt_resumed, resumed, opt, uninterrupted)
    assert opt_resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_round_trip_keeps_state_dtype():
    params = [torch.randn(4, 3, dtype=torch.bfloat16).requires_grad_()]
    opt = updates.adam(params, 0.01, state_dtype=torch.float32)
    opt.step([torch.randn(4, 3, dtype=torch.bfloat16)])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = updates.adam(params, 0.01, state_dtype=torch.float32)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.state[params[0]]["m"].dtype == torch.float32
    assert fresh.state[params[0]]["v"].dtype == torch.float32
    assert torch.equal(fresh.state[params[0]]["m"], opt.state[params[0]]["m"])


# --- schedulers ---------------------------------------------------------------------------

LR0 = 0.1
G = 0.5  # constant gradient (exact in binary)
N_SCHED = 8


def _cos_anneal(start, end, pct):
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _onecycle_lr_mom(k, max_lr=1.0, total=10, pct_start=0.3, div=25.0, final_div=1e4, base_m=0.85, max_m=0.95):
    initial = max_lr / div
    end_up = float(pct_start * total) - 1
    end_down = total - 1
    if k <= end_up:
        pct = k / end_up
        return _cos_anneal(initial, max_lr, pct), _cos_anneal(max_m, base_m, pct)
    pct = (k - end_up) / (end_down - end_up)
    return _cos_anneal(max_lr, initial / final_div, pct), _cos_anneal(base_m, max_m, pct)


SCHEDULERS = {
    "StepLR": (lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5), lambda k: LR0 * 0.5 ** (k // 2)),
    "LambdaLR": (lambda o: lr_scheduler.LambdaLR(o, lambda e: 1.0 / (e + 1)), lambda k: LR0 / (k + 1)),
    "ExponentialLR": (lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9), lambda k: LR0 * 0.9**k),
    "CosineAnnealingLR": (
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=N_SCHED, eta_min=0.01),
        lambda k: _cos_anneal(LR0, 0.01, k / N_SCHED),
    ),
    "MultiStepLR": (
        lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
        lambda k: LR0 * 0.1 ** ((k >= 2) + (k >= 5)),
    ),
    "OneCycleLR(no momentum cycling)": (
        lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10, cycle_momentum=False),
        lambda k: _onecycle_lr_mom(k)[0],
    ),
    # patience 0, constant metric: the first call records the best, every later call reduces
    "ReduceLROnPlateau": (
        lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
        lambda k: LR0 * 0.5 ** max(0, k - 1),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_scheduler_drives_lr_and_the_next_step_uses_it(name, tensor_lr):
    make_scheduler, expected_lr = SCHEDULERS[name]
    lr = torch.tensor(LR0, dtype=torch.float64) if tensor_lr else LR0
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = updates.sgd([p], lr)
    scheduler = make_scheduler(opt)
    value = 0.0
    for k in range(N_SCHED):
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(expected_lr(k), rel=1e-12, abs=1e-15)
        opt.step([torch.full((3,), G, dtype=torch.float64)])
        value -= expected_lr(k) * G
        if name == "ReduceLROnPlateau":
            scheduler.step(1.0)
        else:
            scheduler.step()
    assert p.detach().tolist() == pytest.approx([value] * 3, rel=1e-12, abs=1e-15)
    if tensor_lr:
        assert opt.param_groups[0]["lr"] is lr  # schedulers write into the tensor


@pytest.mark.parametrize("rule", ["momentum", "nesterov_momentum"])
def test_onecycle_cycles_momentum_of_a_momentum_optimizer(rule):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = getattr(updates, rule)([p], 0.1)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, cycle_momentum=True)
    value, velocity = 0.0, 0.0
    for k in range(10):
        lr, mom = _onecycle_lr_mom(k)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert opt.param_groups[0]["momentum"] == pytest.approx(mom, rel=1e-12)
        opt.step([torch.full((2,), G, dtype=torch.float64)])
        # docs/design.md, section 3: v <- mom*v - lr*g; p <- p + v (heavy ball) or p + mom*v - lr*g (Nesterov)
        velocity = mom * velocity - lr * G
        value = value + velocity if rule == "momentum" else value + mom * velocity - lr * G
        scheduler.step()
    assert p.detach().tolist() == pytest.approx([value] * 2, rel=1e-10)


@pytest.mark.parametrize("name", ["adam", "adamax", "amsgrad"])
def test_onecycle_with_default_arguments_cycles_beta1(name):
    """OneCycleLR's default cycle_momentum=True cycles beta1 through torch's "betas" key,
    as on torch.optim.Adam; each step takes the new "betas" into beta1/beta2."""
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = getattr(updates, name)([p], 0.01)
    scheduler = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    reference = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ref_opt = getattr(updates, name)([reference], 0.01)
    group = opt.param_groups[0]
    for k in range(1, 4):
        opt.step([torch.ones(2, dtype=torch.float64)])
        lr_before, beta1_before = _onecycle_lr_mom(k - 1)
        assert group["beta1"] == pytest.approx(beta1_before, rel=1e-12)
        assert group["betas"] == (group["beta1"], group["beta2"]) == (group["beta1"], 0.999)
        ref_opt.param_groups[0].update(lr=lr_before, beta1=beta1_before)
        ref_opt.step([torch.ones(2, dtype=torch.float64)])
        scheduler.step()
        lr, beta1 = _onecycle_lr_mom(k)
        assert group["lr"] == pytest.approx(lr, rel=1e-12)
        assert group["betas"][0] == pytest.approx(beta1, rel=1e-12)
        assert group["betas"][1] == 0.999
    assert torch.equal(p, reference)


def test_scheduler_state_survives_checkpoint():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = updates.momentum([p], 0.1)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.step([torch.ones(2, dtype=torch.float64)])
        sched.step()
    q = p.detach().clone().requires_grad_()
    opt2 = updates.momentum([q], 0.1)
    sched2 = lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(sched.state_dict())
    for _ in range(2):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step([torch.ones(2, dtype=torch.float64)])
            s.step()
    assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == 0.1 * 0.5**4


# --- tensor hyperparameters ---------------------------------------------------------------


def test_tensor_learning_rate_is_read_at_every_step():
    eta = torch.tensor(0.1, dtype=torch.float64)
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = updates.sgd([p], eta)
    assert opt.param_groups[0]["lr"] is eta
    g = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    opt.step([g])
    expected = 1.0 - 0.1 * g
    assert torch.equal(p.detach(), expected)
    eta.mul_(0.1)
    opt.step([g])
    expected = expected - (0.1 * 0.1) * g
    torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=1e-15)
    eta.zero_()
    opt.step([g])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)


def test_tensor_betas_changed_in_place_take_effect():
    lr_t, b1_t, b2_t = (torch.tensor(v, dtype=torch.float64) for v in (0.01, 0.9, 0.999))
    a, b = make_params(), make_params()
    opt_t = updates.adam(a, lr_t, beta1=b1_t, beta2=b2_t)
    opt_f = updates.adam(b, 0.01, beta1=0.9, beta2=0.999)
    grads = make_grads(4)
    for g in grads[:2]:
        opt_t.step(g)
        opt_f.step(g)
    lr_t.fill_(0.05)
    b1_t.fill_(0.5)
    b2_t.fill_(0.9)
    opt_f.param_groups[0].update(lr=0.05, beta1=0.5, beta2=0.9)
    stale = clones(b)
    stale_opt = updates.adam(stale, 0.01)
    stale_opt.load_state_dict(copy.deepcopy(opt_f.state_dict()))
    stale_opt.param_groups[0].update(lr=0.01, beta1=0.9, beta2=0.999)
    for g in grads[2:]:
        opt_t.step(g)
        opt_f.step(g)
        stale_opt.step(g)
    for pa, pb, ps in zip(a, b, stale, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(pa, ps)


def test_tensor_hyperparameter_identity_survives_load_state_dict():
    eta = torch.tensor(0.1, dtype=torch.float64)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = updates.momentum([p], eta, momentum=torch.tensor(0.5, dtype=torch.float64))
    opt.step([torch.ones(2, dtype=torch.float64)])
    eta.fill_(0.2)
    for via_bytes in (False, True):
        eta2 = torch.tensor(7.0, dtype=torch.float64)
        mom2 = torch.tensor(0.0, dtype=torch.float64)
        q = p.detach().clone().requires_grad_()
        opt2 = updates.momentum([q], eta2, momentum=mom2)
        sd = _save_bytesio(opt, [p])["opt"] if via_bytes else copy.deepcopy(opt.state_dict())
        opt2.load_state_dict(sd)
        assert opt2.param_groups[0]["lr"] is eta2
        assert opt2.param_groups[0]["momentum"] is mom2
        assert float(eta2) == 0.2 and float(mom2) == 0.5
        velocity = float(opt2.state[q]["velocity"][0])
        assert velocity == -0.1
        eta2.fill_(0.05)  # in-place change after loading still drives the optimizer
        opt2.step([torch.ones(2, dtype=torch.float64)])
        expected_velocity = 0.5 * velocity - 0.05
        assert q.detach().tolist() == pytest.approx([-0.1 + expected_velocity] * 2, rel=1e-14)


# --- hooks ----------------------------------------------------------------------------------


def test_step_pre_and_post_hooks_fire():
    params = make_params()
    opt = updates.adam(params, 0.1)
    events = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        events.append(("pre", params[0].detach().clone()))

    def post(optimizer, args, kwargs):
        assert optimizer is opt
        events.append(("post", params[0].detach().clone()))

    h_pre = opt.register_step_pre_hook(pre)
    h_post = opt.register_step_post_hook(post)
    before = params[0].detach().clone()
    opt.step(_loss(params))
    assert [e[0] for e in events] == ["pre", "post"]
    assert torch.equal(events[0][1], before)
    assert torch.equal(events[1][1], params[0].detach())
    assert not torch.equal(events[1][1], before)
    h_pre.remove()
    h_post.remove()
    opt.step(make_grads(1)[0])
    assert len(events) == 2


def test_a_pre_hook_replaces_the_steps_arguments_and_global_hooks_fire():
    params = make_params()
    opt = updates.sgd(params, 0.5)
    replaced = [torch.ones_like(p) for p in params]
    events = []
    own = opt.register_step_pre_hook(lambda o, args, kwargs: ((o, replaced), {}))
    pre = register_optimizer_step_pre_hook(lambda o, a, k: events.append("global pre"))
    post = register_optimizer_step_post_hook(lambda o, a, k: events.append("global post"))
    try:
        before = [p.detach().clone() for p in params]
        opt.step(make_grads(1)[0])
    finally:
        own.remove()
        pre.remove()
        post.remove()
    assert events == ["global pre", "global post"]
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b - 0.5 * torch.ones_like(b))  # the hook's gradients, not the given ones


class _ScopeSpy:
    """Stands in for ``torch.autograd.profiler.record_function`` and counts the scopes entered."""

    def __init__(self, real):
        self.real, self.names = real, []

    def __call__(self, name, *args, **kwargs):
        self.names.append(name)
        return self.real(name, *args, **kwargs)


@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_the_step_enters_torchs_profiler_scope_only_while_profiling_or_hooked(monkeypatch, engine):
    params = make_params()
    opt = updates.adam(params, 0.1, engine=engine)
    spy = _ScopeSpy(torch.autograd.profiler.record_function)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", spy)
    calls = []
    monkeypatch.setattr(opt, "_optimizer_step_code", lambda: calls.append(True))
    opt.step(make_grads(1)[0])
    assert spy.names == [] and calls == [True]  # torch's Python-tracing entry point still runs
    handle = opt.register_step_post_hook(lambda *_: None)
    opt.step(make_grads(1)[0])
    handle.remove()
    assert spy.names == ["Optimizer.step#Optimizer.step"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        opt.step(make_grads(1)[0])
    assert spy.names == ["Optimizer.step#Optimizer.step"] * 2
    assert "Optimizer.step#Optimizer.step" in {event.name for event in profile.events()}
    assert calls == [True] * 3


# --- which parameters move ------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
def test_frozen_parameters_are_untouched(name):
    trainable = torch.randn(3, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(3, dtype=torch.float64)  # requires_grad=False
    frozen_before = frozen.clone()
    opt = make_rule(name, [trainable, frozen])
    for _ in range(2):
        opt.step((trainable * frozen).sum() + (trainable**2).sum())
    assert torch.equal(frozen, frozen_before)
    assert len(opt.state.get(frozen, {})) == 0
    trainable_before = trainable.detach().clone()
    (trainable * frozen).sum().backward()
    opt.step()
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(trainable.detach(), trainable_before)
    # a gradient given in a list for a frozen parameter is ignored too
    opt.step([torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)])
    assert torch.equal(frozen, frozen_before)
    assert len(opt.state.get(frozen, {})) == 0
    # freezing a parameter later keeps it (and its state) as it is
    trainable.requires_grad_(False)
    kept = trainable.clone()
    kept_state = {k: v.clone() for k, v in opt.state[trainable].items()}
    opt.step([torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)])
    assert torch.equal(trainable, kept)
    for key, value in kept_state.items():
        assert torch.equal(opt.state[trainable][key], value)


@pytest.mark.parametrize("name", RULES)
def test_parameters_without_grad_are_skipped(name):
    a, b = make_params(shapes=[(3,), (4,)])
    b_before = b.detach().clone()
    opt = make_rule(name, [a, b])
    (a**2).sum().backward()
    assert b.grad is None
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert len(opt.state.get(b, {})) == 0
    # None entries of a gradient list skip their parameter too
    a_before = a.detach().clone()
    opt.step([None, torch.ones(4, dtype=torch.float64)])
    assert torch.equal(a.detach(), a_before)
    assert not torch.equal(b.detach(), b_before)


@pytest.mark.parametrize("modifier", ["apply_momentum", "apply_nesterov_momentum"])
def test_momentum_on_a_subset_of_params(modifier):
    a, b = (
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
    )
    lr, mom = 0.1, 0.9
    opt = getattr(updates, modifier)(updates.sgd([a, b], lr), params=[a], momentum=mom)
    assert opt.rule_name == f"{modifier}(sgd, 1 params)"
    pa = pb = velocity = 0.0
    for g in (1.0, -0.5, 2.0, 0.25):
        opt.step([torch.full((2,), g, dtype=torch.float64)] * 2)
        velocity = mom * velocity - lr * g
        pa = pa + velocity if modifier == "apply_momentum" else pa + mom * velocity - lr * g
        pb = pb - lr * g
    assert a.detach().tolist() == pytest.approx([pa] * 2, rel=1e-13)
    assert b.detach().tolist() == pytest.approx([pb] * 2, rel=1e-13)
    assert "velocity" in opt.state[a]
    assert "velocity" not in opt.state.get(b, {})


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("modifier", ["apply_momentum", "apply_nesterov_momentum"])
def test_modifier_wraps_every_rule(name, modifier):
    params = make_params()
    opt = getattr(updates, modifier)(make_rule(name, params), momentum=0.5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.rule_name.startswith(f"{modifier}(")
    before = clones(params)
    for g in make_grads(2):
        opt.step(g)
    for p, b in zip(params, before, strict=True):
        assert not torch.equal(p.detach(), b.detach())
        velocities = [k for k in opt.state[p] if k.startswith("velocity")]
        assert velocities


def test_apply_momentum_on_sgd_matches_torch_sgd_momentum():
    """Lasagne's momentum and torch.optim.SGD(momentum, dampening=0) differ only in where lr sits;
    with lr folded, v_torch = -v/lr, so the parameters coincide to rounding."""
    a = make_params()
    b = clones(a)
    opt = updates.apply_momentum(updates.sgd(a, 0.1), momentum=0.9)
    ref = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    for g in make_grads(5):
        opt.step(g)
        for p, gi in zip(b, g, strict=True):
            p.grad = gi.clone()
        ref.step()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_dtype_kept_in_params_and_state(name, dtype, engine):
    params = make_params(dtype)
    opt = updates.apply_nesterov_momentum(make_rule(name, params, engine=engine), params=[params[0]])
    for g in make_grads(2, dtype=dtype):
        opt.step(g)
    for p in params:
        assert p.dtype == dtype
        for key, value in opt.state[p].items():
            if key.startswith("step"):
                assert value.dtype == torch.int64
            else:
                assert value.dtype == dtype, key


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_state_dtype_float32_for_low_precision_params(low, engine):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(64, generator=gen).to(low).requires_grad_()
    opt = updates.adam([p], 1e-3, state_dtype=torch.float32, engine=engine)
    g = torch.randn(64, generator=gen).to(low)
    opt.step([g])
    assert p.dtype == low
    assert opt.state[p]["m"].dtype == torch.float32
    assert opt.state[p]["v"].dtype == torch.float32
    # m = (1 - beta1) g computed in float32: far more precise than the low dtype could hold
    torch.testing.assert_close(opt.state[p]["m"], 0.1 * g.double(), rtol=1e-6, atol=0, check_dtype=False)
    torch.testing.assert_close(opt.state[p]["v"], 0.001 * g.double() ** 2, rtol=1e-5, atol=0, check_dtype=False)
    # without the opt-in, state follows the parameter
    q = p.detach().clone().requires_grad_()
    plain = updates.adam([q], 1e-3, engine=engine)
    plain.step([g])
    assert plain.state[q]["m"].dtype == low


def test_state_dtype_does_not_downcast_higher_precision():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = updates.rmsprop([p], 0.1, state_dtype=torch.float32)
    opt.step([torch.ones(3, dtype=torch.float64)])
    assert opt.state[p]["accu"].dtype == torch.float64


# --- complex and sparse -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_sgd_on_complex_equals_real_math(engine):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    expected_re, expected_im = z.detach().real.numpy().copy(), z.detach().imag.numpy().copy()
    opt = updates.sgd([z], 0.3, engine=engine)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
        opt.step([g])
        expected_re = expected_re - 0.3 * g.real.numpy()
        expected_im = expected_im - 0.3 * g.imag.numpy()
    assert z.dtype == torch.complex128
    assert (z.detach().real.numpy() == expected_re).all()
    assert (z.detach().imag.numpy() == expected_im).all()


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adamax", "amsgrad", "adadelta", "adagrad", "nesterov_momentum"])
@pytest.mark.parametrize("engine", ["foreach", "reference"])
def test_complex_is_real_and_imaginary_parts_independently(name, engine):
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(3, 4, dtype=torch.complex64, generator=gen).requires_grad_()
    other = torch.randn(5, generator=gen).requires_grad_()  # a real parameter in the same optimizer
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    other_r = other.detach().clone().requires_grad_()
    opt_z = make_rule(name, [z, other], learning_rate=0.01, engine=engine)
    opt_r = make_rule(name, [r, other_r], learning_rate=0.01, engine=engine)
    for _ in range(3):
        g = torch.randn(3, 4, dtype=torch.complex64, generator=gen)
        g_other = torch.randn(5, generator=gen)
        opt_z.step([g, g_other])
        opt_r.step([torch.view_as_real(g).clone(), g_other])
    assert z.dtype == torch.complex64
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert torch.equal(other, other_r)


def test_complex_loss_gradients():
    z = torch.tensor([1 + 2j, -1 + 0.5j], dtype=torch.complex128, requires_grad=True)
    opt = updates.sgd([z], 0.25)
    opt.step((z.abs() ** 2).sum())  # d/dz* |z|^2 = z; torch's convention gives grad 2z
    torch.testing.assert_close(z.detach(), torch.tensor([1 + 2j, -1 + 0.5j], dtype=torch.complex128) * 0.5)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov_momentum"])
def test_sparse_gradient_equals_dense(name):
    torch.manual_seed(0)
    sparse_emb = torch.nn.Embedding(6, 3, sparse=True).double()
    dense_emb = torch.nn.Embedding(6, 3, sparse=False).double()
    dense_emb.load_state_dict(sparse_emb.state_dict())
    opt_s = make_rule(name, sparse_emb.parameters(), learning_rate=0.1)
    opt_d = make_rule(name, dense_emb.parameters(), learning_rate=0.1)
    for idx in ([1, 3, 1], [0, 5], [2, 2, 2, 4]):
        index = torch.tensor(idx)
        for emb, opt in ((sparse_emb, opt_s), (dense_emb, opt_d)):
            opt.zero_grad()
            (emb(index) ** 2).sum().backward()
        assert sparse_emb.weight.grad.is_sparse
        opt_s.step()
        opt_d.step()
    assert torch.equal(sparse_emb.weight, dense_emb.weight)
    # a sparse tensor in a gradient list is accepted as well
    w = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(4, 2, dtype=torch.float64)
    g[1] = torch.tensor([1.0, 2.0], dtype=torch.float64)
    updates.sgd([w], 0.5).step([g.to_sparse()])
    assert torch.equal(w.detach(), -0.5 * g)


# --- repr, copies -------------------------------------------------------------------------


def test_repr_and_rule_name():
    params = make_params()
    opt = updates.apply_nesterov_momentum(updates.adam(params, 0.01), params=params[:2])
    assert opt.rule_name == "apply_nesterov_momentum(adam, 2 params)"
    text = repr(opt)
    assert "apply_nesterov_momentum(adam" in text
    assert "lr=0.01" in text and "beta1=0.9" in text and "momentum=0.9" in text
    assert "foreach" in text
    full = updates.apply_momentum(updates.rmsprop(params), momentum=0.5)
    assert full.rule_name == "apply_momentum(rmsprop)"
    assert updates.adadelta(params, engine="reference").rule_name == "adadelta"
    assert "reference" in repr(updates.adadelta(params, engine="reference"))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["adam", "nesterov(adam)", "momentum(rmsprop, subset)"])
def test_optimizer_can_be_copied(how, kind):
    params = make_params()
    opt = _build(kind, params)
    grads = make_grads(4)
    for g in grads[:2]:
        opt.step(g)
    bundle = {"params": params, "opt": opt}
    copied = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    params2, opt2 = copied["params"], copied["opt"]
    assert opt2.rule_name == opt.rule_name
    assert all(p2 is not p for p2, p in zip(params2, params, strict=True))
    for g in grads[2:]:
        opt.step(g)
        opt2.step(g)
    assert_bitwise(params2, params)
    assert_same_state(opt2, params2, opt, params)


@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [(torch.complex64, None), (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, None)],
)
def test_checkpoint_continuation_for_complex_and_low_precision(dtype, state_dtype):
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(5, generator=gen, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
    grads = [torch.randn(5, generator=gen, dtype=start.dtype) if dtype.is_complex else torch.randn(5).to(dtype)]
    grads += [(grads[0] * (k + 2) * 0.37).to(dtype) for k in range(5)]

    def build(p):
        return updates.apply_momentum(updates.adam([p], 0.01, state_dtype=state_dtype), momentum=0.5)

    uninterrupted = start.clone().requires_grad_()
    opt = build(uninterrupted)
    for g in grads:
        opt.step([g])
    first = start.clone().requires_grad_()
    opt_first = build(first)
    for g in grads[:3]:
        opt_first.step([g])
    checkpoint = _save_bytesio(opt_first, [first])
    resumed = checkpoint["params"][0].clone().requires_grad_()
    opt_resumed = build(resumed)
    opt_resumed.load_state_dict(checkpoint["opt"])
    for g in grads[3:]:
        opt_resumed.step([g])
    assert_bitwise([resumed], [uninterrupted])
    assert_same_state(opt_resumed, [resumed], opt, [uninterrupted])
    expected_state_dtype = state_dtype or dtype
    assert opt_resumed.state[resumed]["m"].dtype == expected_state_dtype
    assert opt_resumed.state[resumed]["velocity"].dtype == expected_state_dtype
