"""Property tests: random shapes, dtypes, groups and hyperparameters in their valid ranges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchupdates as updates
from torchupdates.registry import RULE_NAMES as RULES

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

HYPER = {
    "sgd": [],
    "momentum": ["momentum"],
    "nesterov_momentum": ["momentum"],
    "adagrad": ["epsilon"],
    "rmsprop": ["rho", "epsilon"],
    "adadelta": ["rho", "epsilon"],
    "adam": ["beta1", "beta2", "epsilon"],
    "adamax": ["beta1", "beta2", "epsilon"],
    "amsgrad": ["beta1", "beta2", "epsilon"],
}
DECAY_NAMES = {"momentum", "rho", "beta1", "beta2"}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)  # 0-d and 0-size included
decays = st.floats(0.0, 0.999)
epsilons = st.one_of(st.just(0.0), st.floats(1e-10, 1e-2))
learning_rates = st.floats(0.0, 1.0)


@st.composite
def configurations(draw, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), eps=None):
    rule = draw(st.sampled_from(RULES))
    hyper = {"learning_rate": draw(learning_rates)}
    for name in HYPER[rule]:
        hyper[name] = draw(decays if name in DECAY_NAMES else (epsilons if eps is None else eps))
    return {
        "rule": rule,
        "hyper": hyper,
        # which hyperparameters are 0-d tensors, and of which dtype
        "tensors": draw(st.sampled_from(["none", "lr", "all"])),
        "tensor_dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "modifier": draw(st.sampled_from([None, "apply_momentum", "apply_nesterov_momentum"])),
        "modifier_momentum": draw(decays),
        "subset": draw(st.booleans()),
        "dtype": draw(st.sampled_from(dtypes)),
        "shapes": draw(st.lists(shapes, min_size=1, max_size=4)),
        "two_groups": draw(st.booleans()),
        "group_lr": draw(learning_rates),
        "steps": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _run(config, engine):
    dtype = config["dtype"]
    gen = torch.Generator().manual_seed(config["seed"])
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in config["shapes"]]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in config["shapes"]] for _ in range(config["steps"])]
    hyper = dict(config["hyper"])
    as_tensor = {"none": [], "lr": ["learning_rate"], "all": list(hyper)}[config["tensors"]]
    for name in as_tensor:
        hyper[name] = torch.tensor(hyper[name], dtype=config["tensor_dtype"])
    if config["two_groups"] and len(params) > 1:
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": config["group_lr"]}]
    else:
        groups = params
    opt = getattr(updates, config["rule"])(groups, engine=engine, **hyper)
    if config["modifier"]:
        subset = params[::2] if config["subset"] else None
        momentum = config["modifier_momentum"]
        if config["tensors"] == "all":
            momentum = torch.tensor(momentum, dtype=config["tensor_dtype"])
        opt = getattr(updates, config["modifier"])(opt, params=subset, momentum=momentum)
    for g in grads:
        opt.step(g)
    return params, opt


@SETTINGS
@given(configurations())
def test_engines_agree_bitwise_and_keep_dtype(config):
    params_ref, opt_ref = _run(config, "reference")
    params_fe, opt_fe = _run(config, "foreach")
    for p_ref, p_fe in zip(params_ref, params_fe, strict=True):
        assert p_ref.dtype == p_fe.dtype == config["dtype"]
        torch.testing.assert_close(p_fe, p_ref, rtol=0, atol=0, equal_nan=True)
        state_ref, state_fe = opt_ref.state[p_ref], opt_fe.state[p_fe]
        assert sorted(state_ref) == sorted(state_fe)
        for key in state_ref:
            expected_dtype = torch.int64 if key.startswith("step") else config["dtype"]
            assert state_ref[key].dtype == state_fe[key].dtype == expected_dtype
            torch.testing.assert_close(state_fe[key], state_ref[key], rtol=0, atol=0, equal_nan=True)


@SETTINGS
@given(configurations(dtypes=(torch.float32, torch.float64), eps=st.floats(1e-8, 1e-2)))
def test_finite_inputs_with_sane_hyperparameters_give_finite_results(config):
    # Finite gradients, decays in [0, 1) and a positive epsilon: nothing can divide by zero
    # or overflow in a few steps, so every parameter and state value stays finite.
    params, opt = _run(config, "foreach")
    for param in params:
        assert torch.isfinite(param).all()
        assert all(torch.isfinite(value).all() for value in opt.state[param].values())


@SETTINGS
@given(configurations())
def test_step_equals_apply_updates_of_updates(config):
    params_a, opt_a = _run(config, "foreach")
    params_b, opt_b = _run(config, "foreach")
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params_a]
    before = [p.detach().clone() for p in params_b]
    upd = opt_b.updates(grads)
    for p, b in zip(params_b, before, strict=True):
        assert torch.equal(p.detach(), b)  # updates() writes nothing
    updates.apply_updates(upd)
    opt_a.step(grads)
    for p_a, p_b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(p_b, p_a, rtol=0, atol=0, equal_nan=True)
        for key in opt_a.state[p_a]:
            torch.testing.assert_close(opt_b.state[p_b][key], opt_a.state[p_a][key], rtol=0, atol=0, equal_nan=True)


@st.composite
def constraint_inputs(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    log_scale = draw(st.floats(-3, 3))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10**log_scale).to(dtype)
    axes_choice = draw(st.sampled_from(["default", "lasagne", "random"]))
    if axes_choice == "default":
        axes = None
    elif axes_choice == "lasagne":
        axes = (0,)
    else:
        axes = tuple(draw(st.sets(st.integers(-ndim, ndim - 1).map(lambda a: a % ndim), min_size=1)))
    max_norm = draw(st.one_of(st.just(0.0), st.floats(1e-3, 10.0)))
    return x, axes, max_norm


def _norms(x, axes):
    return torch.sqrt((x.double() ** 2).sum(dim=axes, keepdim=True))


@SETTINGS
@given(constraint_inputs())
def test_norm_constraint_never_increases_a_norm(inputs):
    x, axes, max_norm = inputs
    result = updates.norm_constraint(x, max_norm, norm_axes=axes)
    assert result.dtype == x.dtype and result.shape == x.shape
    assert torch.isfinite(result).all()
    dims = tuple(range(1, x.dim())) if axes is None else axes
    before, after = _norms(x, dims), _norms(result, dims)
    slack = 1e-5 if x.dtype == torch.float32 else 1e-12
    assert (after <= before * (1 + slack)).all()
    assert (after <= max_norm * (1 + slack)).all()
    # elementwise the magnitude never grows either
    assert (result.abs() <= x.abs()).all()


@SETTINGS
@given(
    st.lists(shapes, min_size=1, max_size=5),
    st.sampled_from([torch.float32, torch.float64]),
    st.floats(-3, 3),
    st.one_of(st.just(0.0), st.floats(1e-3, 10.0)),
    st.integers(0, 2**16),
)
def test_total_norm_constraint_joint_norm_bounded(shape_list, dtype, log_scale, max_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(s, generator=gen, dtype=torch.float64) * 10**log_scale).to(dtype) for s in shape_list]
    result, norm = updates.total_norm_constraint(xs, max_norm, return_norm=True)
    expected_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in xs))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(norm) == pytest.approx(expected_norm, rel=rtol, abs=1e-30)
    joint = math.sqrt(sum(float((r.double() ** 2).sum()) for r in result))
    assert joint <= max_norm * (1 + rtol)
    assert joint <= expected_norm * (1 + rtol)
    for r, x in zip(result, xs, strict=True):
        assert r.dtype == dtype and r.shape == x.shape


# --- out-of-range hyperparameters always raise ------------------------------------------------

negative = st.one_of(st.floats(max_value=-1e-300, allow_nan=False), st.just(float("-inf")), st.just(float("nan")))
outside_unit = st.one_of(
    negative, st.floats(min_value=1.0, allow_nan=False), st.just(float("inf")), st.just(float("nan"))
)


@st.composite
def bad_hyperparameters(draw):
    rule = draw(st.sampled_from(RULES))
    name = draw(st.sampled_from(["learning_rate", *HYPER[rule]]))
    value = draw(outside_unit if name in DECAY_NAMES else negative)
    as_tensor = draw(st.booleans())
    where = draw(st.sampled_from(["constructor", "group", "add_param_group", "later"]))
    return rule, name, value, as_tensor, where


@SETTINGS
@given(bad_hyperparameters())
def test_out_of_range_hyperparameters_always_raise(case):
    rule, name, value, as_tensor, where = case
    if as_tensor:
        value = torch.tensor(value, dtype=torch.float64)
    build = getattr(updates, rule)
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    base = {} if name == "learning_rate" else {"learning_rate": 0.1}
    key = "lr" if name == "learning_rate" and where != "constructor" else name
    with pytest.raises(ValueError, match=name):
        if where == "constructor":
            build([a, b], **base, **{name: value})
        elif where == "group":
            build([{"params": [a]}, {"params": [b], key: value}], learning_rate=0.1)
        elif where == "add_param_group":
            opt = build([a], learning_rate=0.1)
            opt.add_param_group({"params": [b], key: value})
        else:
            opt = build([a, b], learning_rate=0.1)
            opt.step([torch.ones(3), torch.ones(2)])
            before = [p.detach().clone() for p in (a, b)]
            opt.param_groups[0][key] = value
            try:
                opt.step([torch.ones(3), torch.ones(2)])
            finally:
                assert all(torch.equal(p.detach(), q) for p, q in zip((a, b), before, strict=True))


@SETTINGS
@given(st.sampled_from(["apply_momentum", "apply_nesterov_momentum"]), outside_unit)
def test_out_of_range_modifier_momentum_always_raises(modifier, value):
    opt = updates.adam([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="momentum"):
        getattr(updates, modifier)(opt, momentum=value)


@SETTINGS
@given(st.integers(0, 8).filter(lambda n: n not in (2, 3, 4, 5)))
def test_norm_constraint_rejects_unsupported_dimensionality(ndim):
    with pytest.raises(ValueError, match="Unsupported tensor dimensionality"):
        updates.norm_constraint(torch.ones((1,) * ndim), 1.0)


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from(["momentum", "adam", "adadelta"]))
def test_numpy_sgd_family_agreement_float64(seed, rule):
    """A short float64 NumPy transcription of docs/design.md, section 3 "The math", for three rules."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(3)]
    x = p.detach().numpy().copy()
    if rule == "momentum":
        opt, vel = updates.momentum([p], 0.1, momentum=0.9), np.zeros(5)
        for g in grads:
            u = x - 0.1 * g.numpy()
            nxt = 0.9 * vel + u
            vel, x = nxt - x, nxt
    elif rule == "adam":
        opt, m, v = updates.adam([p], 0.01), np.zeros(5), np.zeros(5)
        for t, g in enumerate(grads, 1):
            g = g.numpy()
            a = 0.01 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            m = 0.9 * m + (1 - 0.9) * g
            v = 0.999 * v + (1 - 0.999) * g**2
            x = x - a * m / (np.sqrt(v) + 1e-8)
    else:
        opt, acc, dacc = updates.adadelta([p], 1.0), np.zeros(5), np.zeros(5)
        for g in grads:
            g = g.numpy()
            acc = 0.95 * acc + 0.05 * g**2
            d = g * np.sqrt(dacc + 1e-6) / np.sqrt(acc + 1e-6)
            x = x - 1.0 * d
            dacc = 0.95 * dacc + 0.05 * d**2
    for g in grads:
        opt.step([g])
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("engine", ["reference", "foreach"])
def test_zero_dim_parameter_with_float64_tensor_hyperparameters(rule, engine):
    """A 0-d float32 parameter is computed in float32 like any other float32 parameter.

    (Two 0-d tensors promote to the wider dtype, so a float64 0-d hyperparameter must not
    turn a 0-d parameter's arithmetic into float64 in one engine only.)
    """
    hyper = {"learning_rate": 0.7, **{name: 0.3 if name in DECAY_NAMES else 1e-3 for name in HYPER[rule]}}
    tensors = {name: torch.tensor(value, dtype=torch.float64) for name, value in hyper.items()}
    grads = [0.1, 0.3, 1.3, -0.7]
    results = {}
    for label, shape in (("0-d", ()), ("(1,)", (1,))):
        p = torch.zeros(shape).requires_grad_()
        opt = getattr(updates, rule)([p], engine=engine, **tensors)
        for g in grads:
            opt.step([torch.full(shape, g)])
        assert p.dtype == torch.float32
        results[label] = p.detach().reshape(1)
    # the same numbers in a (1,)-shaped parameter, or from the other engine, must agree bit for bit
    assert torch.equal(results["0-d"], results["(1,)"]), results
    other = "foreach" if engine == "reference" else "reference"
    p = torch.zeros(()).requires_grad_()
    opt = getattr(updates, rule)([p], engine=other, **tensors)
    for g in grads:
        opt.step([torch.full((), g)])
    assert torch.equal(p.detach().reshape(1), results["0-d"])
