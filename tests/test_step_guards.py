"""Inside ``step()``: ``skip_nonfinite``, ``max_grad_norm`` and ``apply_norm_constraint``.

Each is compared with what a user would do outside the step, which is the definition: a run
that never sees the bad batch, :func:`total_norm_constraint` of the gradients followed by a
plain step, and :func:`norm_constraint` applied to the update dictionary. On every engine,
in float64 and float32, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import torchupdates as updates
from compiler import needs_compiler
from torchupdates.registry import RULE_NAMES as RULES

ENGINES = ["reference", "foreach", pytest.param("compiled", marks=needs_compiler)]
DTYPES = [torch.float64, torch.float32]
SHAPES = [(3, 4), (2, 3, 2, 2), (5,), ()]
LEARNING_RATES = {"sgd": 0.1, "momentum": 0.05, "nesterov_momentum": 0.05}
STEPS = 6
BAD_STEP = 3


def build(rule: str, params: list[torch.Tensor], engine: str, **options: object) -> updates.Optimizer:
    """The rule (with momentum on top when it has none of its own) on ``params``."""
    hyper = {"learning_rate": LEARNING_RATES[rule]} if rule in LEARNING_RATES else {}
    opt = getattr(updates, rule)(params, engine=engine, **hyper, **options)
    return opt if "momentum" in rule else updates.apply_momentum(opt, params[1:3])


def problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    init = [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
    grads = [[3 * torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES] for _ in range(STEPS)]
    return init, grads


def leaves(init: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone().requires_grad_(True) for p in init]


def tensors(opt: updates.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_a_nonfinite_batch_is_skipped(rule: str, engine: str, dtype: torch.dtype, bad: float) -> None:
    init, grads = problem(dtype)
    poisoned = [[g.clone() for g in step] for step in grads]
    poisoned[BAD_STEP][1].view(-1)[5] = bad
    skipping_params, clean_params = leaves(init), leaves(init)
    skipping = build(rule, skipping_params, engine, skip_nonfinite=True)
    clean = build(rule, clean_params, engine)
    for k, step in enumerate(poisoned):
        skipping.step(step)
        if k != BAD_STEP:
            clean.step(grads[k])
    assert skipping.skipped_steps == 1
    assert_same(tensors(skipping, skipping_params), tensors(clean, clean_params))


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_finite_gradients_whose_squares_overflow_are_not_skipped(dtype: torch.dtype, clip: float | None) -> None:
    # 3e19 (float32) and 300 (float16) square to infinity: a norm-based check alone would
    # take these finite batches for non-finite ones. A 0-element gradient rides along.
    big = 3e19 if dtype == torch.float32 else 300.0
    params = [torch.zeros(4, dtype=dtype, requires_grad=True), torch.zeros(0, dtype=dtype, requires_grad=True)]
    grads = [torch.tensor([big, -big, 1.0, 0.0], dtype=dtype), torch.zeros(0, dtype=dtype)]
    opt = updates.sgd(params, 0.5, skip_nonfinite=True, max_grad_norm=clip)
    opt.step(grads)
    assert opt.skipped_steps == 0
    expected = [-0.5 * big, 0.5 * big, -0.5, 0.0]
    if clip is not None:  # the norm, by hand: sqrt(2 big^2 + 1); clip / (1e-7 + norm) scales the step
        norm = (2 * big**2 + 1) ** 0.5
        expected = [-0.5 * g * (clip / (1e-7 + norm)) for g in (big, -big, 1.0, 0.0)]
    torch.testing.assert_close(
        params[0].detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-3, atol=0
    )
    grads[0][2] = float("nan")
    opt.step(grads)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_whose_joint_norm_overflows_are_clipped_to_zero_not_skipped(engine: str) -> None:
    # Finite float32 gradients of joint norm above the largest float32: the norm is infinite,
    # so total_norm_constraint's factor is 0 and the clipped gradients are zeros (finite): a
    # step with a zero gradient, not a skipped one. Their sum overflows too (the exact check).
    params = [torch.ones(3, requires_grad=True)]
    grads = [torch.tensor([3e38, 3e38, 1.0])]
    opt = updates.sgd(params, 0.5, engine=engine, skip_nonfinite=True, max_grad_norm=1.0)
    opt.step(grads)
    assert opt.skipped_steps == 0 and opt.grad_norm is not None and float(opt.grad_norm) == float("inf")
    assert torch.equal(params[0].detach(), torch.ones(3))  # p - 0.5 * (g * 0)
    unclipped = updates.sgd([torch.ones(3, requires_grad=True)], 0.5, engine=engine, skip_nonfinite=True)
    unclipped.step(grads)
    assert unclipped.skipped_steps == 0


@pytest.mark.parametrize("engine", ["foreach", pytest.param("compiled", marks=needs_compiler)])
def test_skipping_from_grad_writes_nothing_and_survives_a_checkpoint(engine: str) -> None:
    # The steady-state path of a training loop (.grad kept between steps).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = updates.adam(model.parameters(), 0.01, engine=engine, skip_nonfinite=True)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(x).pow(2).mean().backward()
        opt.step()
    before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
    model[0].weight.grad[0, 0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    assert_same([p.detach() for p in model.parameters()], [p.detach() for p in before[0]])
    for saved, now in zip(before[1]["state"].values(), opt.state_dict()["state"].values(), strict=True):
        assert_same(list(saved.values()), list(now.values()))
    fresh = updates.adam(model.parameters(), 0.01, engine=engine, skip_nonfinite=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_clipping_inside_the_step_equals_clipping_outside(rule: str, engine: str, dtype: torch.dtype) -> None:
    init, grads = problem(dtype)
    inside_params, outside_params = leaves(init), leaves(init)
    inside = build(rule, inside_params, engine, max_grad_norm=2.0)
    outside = build(rule, outside_params, engine)
    assert inside.grad_norm is None
    for step in grads:
        inside.step(step)
        clipped, norm = updates.total_norm_constraint(step, 2.0, return_norm=True)
        outside.step(clipped)
        assert inside.grad_norm is not None and torch.equal(inside.grad_norm, norm)
    assert_same(tensors(inside, inside_params), tensors(outside, outside_params))


def test_clipping_is_over_the_parameters_the_step_updates() -> None:
    # A hand calculation: gradients (3, 4) and (0,), norm 5, clipped to norm 1.
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = updates.sgd([a, b], 1.0, max_grad_norm=1.0)
    opt.step([torch.tensor([3.0, 4.0]), None])
    assert float(opt.grad_norm) == 5.0
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6, -0.8]), rtol=1e-6, atol=0)
    assert float(b.detach()) == 0.0


ConstraintChain = Callable[[list[torch.Tensor], str], updates.Optimizer]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_norm_constraint_modifier_equals_editing_the_update_dictionary(
    rule: str, engine: str, dtype: torch.dtype
) -> None:
    init, grads = problem(dtype)
    inside_params, edited_params = leaves(init), leaves(init)
    constrained = [inside_params[0], inside_params[1], inside_params[2]]
    inside = updates.apply_norm_constraint(build(rule, inside_params, engine), 0.5, params=constrained[:2])
    inside = updates.apply_norm_constraint(inside, 0.7, params=constrained[2:], norm_axes=(0,), epsilon=1e-3)
    edited = build(rule, edited_params, engine)
    for step in grads:
        inside.step(step)
        dictionary = edited.updates(step)
        for param in edited_params[:2]:
            dictionary[param] = updates.norm_constraint(dictionary[param], 0.5)
        dictionary[edited_params[2]] = updates.norm_constraint(dictionary[edited_params[2]], 0.7, (0,), 1e-3)
        updates.apply_updates(dictionary)
    assert_same(tensors(inside, inside_params), tensors(edited, edited_params))


@pytest.mark.parametrize("engine", ENGINES)
def test_momentum_after_the_constraint_sees_the_constrained_proposal(engine: str) -> None:
    # apply_momentum(apply_norm_constraint(adam)), against the formulas written out here.
    init, grads = problem(torch.float64)
    params = leaves(init)[:2]
    opt = updates.apply_momentum(
        updates.apply_norm_constraint(updates.adam(params, 0.1, engine=engine), 0.05), momentum=0.5
    )
    plain_params = leaves(init)[:2]
    plain = updates.adam(plain_params, 0.1, engine=engine)
    velocity = [torch.zeros_like(p) for p in init[:2]]
    for step in grads:
        opt.step(step[:2])
        proposals = plain.updates(step[:2])
        for i, p in enumerate(plain_params):
            u = updates.norm_constraint(proposals[p], 0.05)
            x = 0.5 * velocity[i] + u
            velocity[i] = x - p.detach()
            proposals[p] = x
        updates.apply_updates(proposals)
    assert_same([p.detach() for p in params], [p.detach() for p in plain_params])
    assert_same([opt.state[p]["velocity"] for p in params], velocity)


def test_updates_reflects_the_guards_and_the_constraint() -> None:
    init, grads = problem(torch.float64)
    stepped_params, dict_params = leaves(init[:2]), leaves(init[:2])
    make = lambda p: updates.apply_norm_constraint(updates.rmsprop(p, 0.1, max_grad_norm=1.0, skip_nonfinite=True), 0.2)  # noqa: E731
    stepped, by_dict = make(stepped_params), make(dict_params)
    bad = [g.clone() for g in grads[0][:2]]
    bad[0].view(-1)[0] = float("nan")
    for step in [grads[0][:2], bad, grads[1][:2]]:
        stepped.step(step)
        updates.apply_updates(by_dict.updates(step))
    assert by_dict.updates(bad) == {} and by_dict.skipped_steps == 2 and stepped.skipped_steps == 1
    assert_same(tensors(stepped, stepped_params), tensors(by_dict, dict_params))


def test_bad_options_are_clear_errors() -> None:
    w = torch.zeros(3, 2, requires_grad=True)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        updates.adam([w], skip_nonfinite="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_grad_norm"):
        updates.adam([w], max_grad_norm=-1.0)
    with pytest.raises(TypeError, match="max_grad_norm"):
        updates.adam([w], max_grad_norm="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unsupported tensor dimensionality 1"):
        updates.apply_norm_constraint(updates.adam([w, torch.zeros(3, requires_grad=True)]), 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        updates.apply_norm_constraint(updates.adam([w]), -1.0)
    with pytest.raises(TypeError, match="wraps a torchupdates Optimizer"):
        updates.apply_norm_constraint(torch.optim.SGD([w], 0.1), 1.0)  # type: ignore[arg-type]
    saved = updates.adam([w]).state_dict()
    saved["skipped_steps"] = -1
    with pytest.raises(ValueError, match="skipped_steps"):
        updates.adam([w]).load_state_dict(saved)
