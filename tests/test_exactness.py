"""Every rule and modifier against the independent NumPy transcription of docs/design.md, section 3 "The math".

Tolerances (measured, not hoped for)
------------------------------------
In float64 the library agrees with ``numpy_reference`` *bit for bit* for sgd, momentum,
nesterov_momentum, adam, adamax and amsgrad. Adagrad, rmsprop and adadelta differ by an ulp
here and there, and the cause is not the library: torch's float64 ``sqrt`` on CPU (a
vectorised AVX-512/VML kernel) is accurate to 1 ulp but not correctly rounded, while NumPy's
is. (About 1% of random inputs differ from ``math.sqrt`` by one ulp; checked while writing
these tests.) Those ulps then travel through the recursions, amplified a little by momentum
(``1/(1-mu)``) and by the cancellation in ``velocity = x - p``. Over 50 steps the worst
element-wise relative error seen was ~3e-15 and the worst error relative to a tensor's
largest element ~1e-15. Tensor hyperparameters add another ulp source: ``beta**t`` of a 0-d
tensor is torch's ``pow`` (repeated multiplication for small integer powers), not C's
``pow``.

So the float64 comparisons use ``rtol = 1e-13`` plus ``atol = 1e-13 * max|reference
tensor|`` (the atol only matters for elements that cancel to near zero, e.g. a velocity
whose sign flips), a margin of ~30x over what is observed and still ~1000x tighter than a
single wrong operation order would give. The engines are compared with each other with
``torch.equal`` (bitwise), and so are ``step`` and ``apply_updates(updates(...))``.

float32 parameters are compared with the float64 reference (run from the same float32
values and gradients) with ``rtol = 1e-5`` and ``atol = 1e-5 * max|reference tensor|``:
single precision rounding (6e-8) accumulated over 50 steps of recursions that divide by
square roots of running averages; the worst seen was ~2e-6.

A velocity ``x - p`` is a difference of parameter values, so its rounding error is at the
parameter's scale; for velocities the atol is taken against ``max(|velocity|, |param|)``
(in float32 a velocity of 3e-4 next to parameters of size 1 has a relative error ~2e-4,
which is rounding, not a bug).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import torchupdates
from compiler import compiler_available, needs_compiler
from numpy_reference import DEFAULTS, ReferenceOptimizer
from torchupdates import apply_updates
from torchupdates.engines import foreach as foreach_engine
from torchupdates.registry import MODIFIER_NAMES as MODIFIERS
from torchupdates.registry import RULE_NAMES as RULES

ENGINES = ["reference", "foreach", pytest.param("compiled", marks=needs_compiler)]

SHAPES: list[tuple[int, ...]] = [(), (5,), (3, 4), (2, 3, 2, 2)]
# Per-tensor gradient scales: 1e-3 makes epsilon matter (g**2 ~ 1e-6 ~ eps), 10 makes it negligible.
GRAD_SCALES = [1e-3, 1.0, 10.0, 0.1]
STEPS = 50
# With the chunk size the tests set below (SMALL_CHUNK), batches are cut into several chunks,
# some holding one tensor larger than a chunk.
SMALL_CHUNK = 50_000
LARGE_SHAPES: list[tuple[int, ...]] = [(), (300, 300), (7,), (40000,), (30000,), (2, 3, 2, 2)]

RTOL64 = 1e-13
ATOL64 = 1e-13  # times the largest |element| of the reference tensor
RTOL32 = 1e-5
ATOL32 = 1e-5

# Learning rates for the rules that have no default.
REQUIRED: dict[str, dict[str, float]] = {
    "sgd": {"learning_rate": 0.1},
    "momentum": {"learning_rate": 0.05},
    "nesterov_momentum": {"learning_rate": 0.05},
}

# Per rule, in the order of the reference's DEFAULTS[rule]: non-default values for every
# hyperparameter (CUSTOM), and a second set for the second param group (OTHER).
_VALUES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "sgd": ((0.03,), (0.2,)),
    "momentum": ((0.02, 0.7), (0.1, 0.3)),
    "nesterov_momentum": ((0.02, 0.6), (0.07, 0.95)),
    "adagrad": ((0.3, 1e-4), (2.0, 1e-2)),
    "rmsprop": ((0.01, 0.8, 1e-5), (0.5, 0.5, 1e-3)),
    "adadelta": ((0.5, 0.9, 1e-5), (2.0, 0.6, 1e-3)),
    "adam": ((0.01, 0.8, 0.99, 1e-4), (0.1, 0.5, 0.9, 1e-2)),
    "adamax": ((0.02, 0.7, 0.95, 1e-4), (0.3, 0.95, 0.5, 1e-3)),
    "amsgrad": ((0.01, 0.85, 0.9, 1e-5), (0.2, 0.6, 0.7, 1e-3)),
}
CUSTOM: dict[str, dict[str, float]] = {
    rule: dict(zip(DEFAULTS[rule], custom, strict=True)) for rule, (custom, _) in _VALUES.items()
}
OTHER: dict[str, dict[str, float]] = {
    rule: dict(zip(DEFAULTS[rule], other, strict=True)) for rule, (_, other) in _VALUES.items()
}


# --- problems ---------------------------------------------------------------------------------


def make_problem(
    seed: int, steps: int = STEPS, dtype: torch.dtype = torch.float64, shapes: Sequence[tuple[int, ...]] = SHAPES
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial values and a fixed gradient sequence; every 7th step zeroes half the entries."""
    rng = np.random.default_rng(seed)
    init = [torch.tensor(rng.standard_normal(s), dtype=dtype) for s in shapes]
    grads = []
    for k in range(steps):
        step = []
        for shape, scale in zip(shapes, itertools.cycle(GRAD_SCALES)):
            g = rng.standard_normal(shape) * scale
            if k % 7 == 3:
                g = g * (rng.random(shape) < 0.5)  # exact zeros: max() and accumulators see them
            step.append(torch.tensor(g, dtype=dtype))
        grads.append(step)
    return init, grads


def leaves(init: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone().requires_grad_(True) for p in init]


def as_numpy(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().to(torch.float64).numpy() for t in tensors]


# --- chains: one description builds both the torch optimizer and the reference ---------------


@dataclass(frozen=True)
class Chain:
    """A rule with its hyperparameters, optional param groups ``(positions, overrides)`` (in
    order, covering every position), then modifiers ``(name, positions or None, hyperparameters)``.

    ``build`` makes the torchupdates optimizer, ``reference`` the NumPy one, from the same text.
    """

    rule: str
    hyper: dict[str, Any] = field(default_factory=dict)
    groups: tuple[tuple[tuple[int, ...], dict[str, Any]], ...] | None = None
    modifiers: tuple[tuple[str, tuple[int, ...] | None, dict[str, Any]], ...] = ()
    id: str = ""

    def build(self, params: Sequence[torch.Tensor], engine: str) -> torchupdates.Optimizer:
        if self.groups is None:
            spec: Any = list(params)
        else:
            # Positions past the end are ignored, so that one chain serves problems of any size.
            spec = [{"params": [params[i] for i in idx if i < len(params)], **over} for idx, over in self.groups]
        opt = getattr(torchupdates, self.rule)(spec, **self.hyper, engine=engine)
        for name, subset, hyper in self.modifiers:
            chosen = None if subset is None else [params[i] for i in subset]
            opt = getattr(torchupdates, name)(opt, chosen, **hyper)
        return opt

    def reference(self, init: Sequence[torch.Tensor]) -> ReferenceOptimizer:
        per_param = [dict(self.hyper) for _ in init]
        for idx, over in self.groups or ():
            for i in (i for i in idx if i < len(init)):
                per_param[i].update({("learning_rate" if k == "lr" else k): v for k, v in over.items()})
        ref = ReferenceOptimizer(as_numpy(init), self.rule, per_param)
        for name, subset, hyper in self.modifiers:
            ref.add_modifier(name, subset, {k: float(v) for k, v in hyper.items()})
        return ref


def rule_chain(rule: str, custom: bool = False) -> Chain:
    return Chain(rule, dict(CUSTOM[rule] if custom else REQUIRED.get(rule, {})))


# --- comparisons -------------------------------------------------------------------------------


def assert_close(
    actual: np.ndarray,
    desired: np.ndarray,
    rtol: float,
    atol_scale: float,
    what: str,
    scale_like: Sequence[np.ndarray] = (),
) -> None:
    """``|actual - desired| <= rtol * |desired| + atol_scale * max|desired or scale_like|``."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, what
    assert np.all(np.isfinite(desired)), f"reference not finite: {what}"
    scale = max([float(np.max(np.abs(x))) for x in (desired, *scale_like) if np.size(x)], default=0.0)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol_scale * scale, err_msg=what)


def assert_matches_reference(
    opt: torchupdates.Optimizer,
    params: Sequence[torch.Tensor],
    ref: ReferenceOptimizer,
    rtol: float = RTOL64,
    atol_scale: float = ATOL64,
    where: str = "",
) -> None:
    for i, p in enumerate(params):
        assert_close(p.detach().to(torch.float64).numpy(), ref.params[i], rtol, atol_scale, f"{where} param {i}")
        expected = ref.state_of(i)
        state = opt.state.get(p, {})
        assert set(state) == set(expected), f"{where} param {i}: state keys {sorted(state)} != {sorted(expected)}"
        for key, value in expected.items():
            got = state[key]
            if key == "step":
                assert got.dtype == torch.int64 and int(got) == int(value), f"{where} param {i}: step"
                continue
            # A velocity is a difference of parameter values (x - p): its rounding error is at
            # the parameter's scale, not at its own, so the atol is measured against both.
            scale_like = (value, ref.params[i]) if key.startswith("velocity") else (value,)
            got64 = got.to(torch.float64).numpy()
            assert_close(got64, value, rtol, atol_scale, f"{where} param {i} {key}", scale_like)


def run_against_reference(
    chain: Chain, engine: str, seed: int = 0, steps: int = STEPS, shapes: Sequence[tuple[int, ...]] = SHAPES
) -> None:
    init, grads = make_problem(seed, steps, shapes=shapes)
    params = leaves(init)
    opt = chain.build(params, engine)
    ref = chain.reference(init)
    for k, g in enumerate(grads):
        opt.step(g)
        ref.step(as_numpy(g))
        if k in (0, 1, steps // 2):  # early steps (bias corrections, zero state) are checked on their own
            assert_matches_reference(opt, params, ref, where=f"step {k + 1}")
    assert_matches_reference(opt, params, ref, where=f"step {steps}")
    # The problem must be non-trivial: every parameter moved.
    for p, p0 in zip(params, init, strict=True):
        assert not torch.equal(p.detach(), p0)


def snapshot(opt: torchupdates.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for group in opt.param_groups for p in group["params"]]
    for state in opt.state.values():
        tensors += [v.clone() for v in state.values()]
    return tensors


def assert_bitwise_equal(
    a: torchupdates.Optimizer, pa: Sequence[torch.Tensor], b: torchupdates.Optimizer, pb: Sequence[torch.Tensor]
) -> None:
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"param {i} differs"
        sa, sb = a.state.get(x, {}), b.state.get(y, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"param {i}: state {key} differs"


# --- each rule, defaults and non-defaults ---------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_reference(rule: str, custom: bool, engine: str) -> None:
    run_against_reference(rule_chain(rule, custom), engine, seed=1 + custom)


def test_reference_defaults_are_the_seeds() -> None:
    # The rules table of docs/design.md, section 2 "The public contract", so that the "default" runs above test
    # the library's defaults.
    adam_like = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}
    assert DEFAULTS["adagrad"] == {"learning_rate": 1.0, "epsilon": 1e-6}
    assert DEFAULTS["rmsprop"] == {"learning_rate": 1.0, "rho": 0.9, "epsilon": 1e-6}
    assert DEFAULTS["adadelta"] == {"learning_rate": 1.0, "rho": 0.95, "epsilon": 1e-6}
    assert DEFAULTS["adam"] == {"learning_rate": 0.001, **adam_like}
    assert DEFAULTS["adamax"] == {"learning_rate": 0.002, **adam_like}
    assert DEFAULTS["amsgrad"] == {"learning_rate": 0.001, **adam_like}
    assert DEFAULTS["momentum"]["momentum"] == DEFAULTS["apply_momentum"]["momentum"] == 0.9
    assert DEFAULTS["apply_nesterov_momentum"]["momentum"] == 0.9


# --- modifiers on every rule ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_modifier_on_rule(modifier: str, rule: str, engine: str) -> None:
    # Default momentum (0.9); on momentum / nesterov_momentum this stacks a second velocity.
    chain = Chain(rule, dict(REQUIRED.get(rule, {})), modifiers=((modifier, None, {}),))
    run_against_reference(chain, engine, seed=3)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("rule", "modifier"),
    [("adam", "apply_momentum"), ("rmsprop", "apply_nesterov_momentum"), ("sgd", "apply_momentum")],
)
def test_modifier_on_subset(rule: str, modifier: str, engine: str) -> None:
    subset = (0, 2)  # the 0-d and the 2-d tensor; 1-d and 4-d keep the rule's own proposal
    chain = Chain(rule, dict(CUSTOM[rule]), modifiers=((modifier, subset, {"momentum": 0.8}),))
    run_against_reference(chain, engine, seed=4)
    # The reference already checked that parameters outside the subset have no velocity.


DOUBLE = [
    Chain(
        "adam",
        dict(CUSTOM["adam"]),
        modifiers=(("apply_momentum", None, {"momentum": 0.5}), ("apply_nesterov_momentum", None, {"momentum": 0.7})),
        id="nesterov(momentum(adam))",
    ),
    Chain(
        "adadelta",
        {},
        modifiers=(("apply_nesterov_momentum", (1, 2, 3), {}), ("apply_momentum", (0, 1), {"momentum": 0.6})),
        id="momentum(nesterov(adadelta, 3 params), 2 params)",
    ),
    Chain(
        "nesterov_momentum",
        {"learning_rate": 0.01, "momentum": 0.5},
        modifiers=(("apply_momentum", (3,), {"momentum": 0.4}), ("apply_nesterov_momentum", None, {"momentum": 0.3})),
        id="nesterov(momentum(nesterov_momentum, 1 param))",
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", DOUBLE, ids=[c.id for c in DOUBLE])
def test_double_composition(chain: Chain, engine: str) -> None:
    run_against_reference(chain, engine, seed=5)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreach_engine, "CPU_CHUNK_ELEMENTS", SMALL_CHUNK)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("engine", ENGINES)
def test_large_tensors(engine: str) -> None:
    # Tensors above the foreach engine's CPU chunk size, mixed with small ones.
    chain = Chain("amsgrad", dict(CUSTOM["amsgrad"]), modifiers=(("apply_nesterov_momentum", (1, 2, 4), {}),))
    run_against_reference(chain, engine, seed=15, steps=10, shapes=LARGE_SHAPES)


def test_double_composition_keys() -> None:
    # Two stages with a hyperparameter of the same name must not share it: the second gets its own key.
    init, grads = make_problem(6, steps=3)
    params = leaves(init)
    opt = DOUBLE[0].build(params, "foreach")
    group = opt.param_groups[0]
    assert group["momentum"] == 0.5
    assert group["momentum_2"] == 0.7
    for g in grads:
        opt.step(g)
    assert set(opt.state[params[0]]) == {"step", "m", "v", "velocity", "velocity_2"}


# --- param groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_param_groups(rule: str, engine: str) -> None:
    # Constructor values (non-default) for group 0, which also overrides one of them with "lr";
    # group 1 overrides every hyperparameter by the rule's own keywords.
    group0 = {"lr": CUSTOM[rule]["learning_rate"] * 0.5}
    chain = Chain(rule, dict(CUSTOM[rule]), groups=(((0, 1), group0), ((2, 3), dict(OTHER[rule]))))
    run_against_reference(chain, engine, seed=7)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_modifier_momentum_per_group(modifier: str, engine: str) -> None:
    # After composing, the modifier's momentum lives in every group and can differ per group.
    init, grads = make_problem(8)
    params = leaves(init)
    opt = getattr(torchupdates, modifier)(
        torchupdates.rmsprop([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], 0.01), momentum=0.8
    )
    opt.param_groups[1]["momentum"] = 0.3
    ref = ReferenceOptimizer(
        as_numpy(init), "rmsprop", [{"learning_rate": 0.01}] * 2 + [{"learning_rate": 0.05}] * 2
    ).add_modifier(modifier, None, [{"momentum": 0.8}] * 2 + [{"momentum": 0.3}] * 2)
    for g in grads:
        opt.step(g)
        ref.step(as_numpy(g))
    assert_matches_reference(opt, params, ref)


# --- gradients from a real loss ---------------------------------------------------------------


class TinyModel(torch.nn.Module):
    """conv (4-d weight, 1-d bias) -> tanh -> linear (2-d weight) -> times a 0-d scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, kernel_size=2)
        self.linear = torch.nn.Linear(8, 1)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("source", ["loss", "grad"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_loss_on_tiny_model(rule: str, engine: str, source: str) -> None:
    torch.manual_seed(9)
    model = TinyModel().double()
    params = list(model.parameters())
    assert sorted(p.dim() for p in params) == [0, 1, 1, 2, 4]
    x = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    hyper = dict(CUSTOM[rule])
    opt = getattr(torchupdates, rule)(model.parameters(), **hyper, engine=engine)
    opt = torchupdates.apply_nesterov_momentum(opt, [model.linear.weight, model.scale], momentum=0.5)
    ref = ReferenceOptimizer(as_numpy(params), rule, hyper)
    subset = [i for i, p in enumerate(params) if p is model.linear.weight or p is model.scale]
    assert len(subset) == 2
    ref.add_modifier("apply_nesterov_momentum", subset, {"momentum": 0.5})
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        if source == "loss":
            opt.step(loss)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        ref.step(as_numpy(grads))
        assert_matches_reference(opt, params, ref)


# --- engines, step vs updates, the update dictionary ---------------------------------------------

CHAINS = [
    *[rule_chain(rule, custom=True) for rule in RULES],
    Chain("amsgrad", dict(CUSTOM["amsgrad"]), modifiers=(("apply_momentum", None, {}),), id="momentum(amsgrad)"),
    Chain("adagrad", {}, modifiers=(("apply_nesterov_momentum", (1, 3), {}),), id="nesterov(adagrad, 2 params)"),
    *DOUBLE,
    Chain(
        "adamax",
        dict(CUSTOM["adamax"]),
        groups=(((0, 1), {"beta1": 0.5}), ((2, 3, 4, 5), dict(OTHER["adamax"]))),
        modifiers=(("apply_momentum", (0, 3), {"momentum": 0.6}),),
        id="momentum(adamax, groups, 2 params)",
    ),
]
CHAIN_IDS = [c.id or c.rule for c in CHAINS]
LARGE_CHAINS = [CHAINS[RULES.index("adam")], CHAINS[-1]]  # for the slower, chunked problems


@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_engines_agree_bitwise(chain: Chain) -> None:
    init, grads = make_problem(10, steps=150)
    _engines_agree_bitwise(chain, init, grads, ["reference", "foreach"])


@needs_compiler
@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_engines_agree_bitwise_float32(chain: Chain) -> None:
    # float32 square roots are correctly rounded on every engine, so all three agree bit for
    # bit. (In float64 torch's eager sqrt is within an ulp, Inductor's correctly rounded: the
    # compiled engine is checked against the NumPy reference there, like the others.)
    init, grads = make_problem(10, steps=60, dtype=torch.float32)
    _engines_agree_bitwise(chain, init, grads, ["reference", "foreach", "compiled"])


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("chain", LARGE_CHAINS, ids=[c.id or c.rule for c in LARGE_CHAINS])
def test_engines_agree_bitwise_large(chain: Chain) -> None:
    init, grads = make_problem(10, steps=20, shapes=LARGE_SHAPES)
    _engines_agree_bitwise(chain, init, grads, ["reference", "foreach"])


def _engines_agree_bitwise(
    chain: Chain, init: list[torch.Tensor], grads: list[list[torch.Tensor]], engines: list[str]
) -> None:
    params = [leaves(init) for _ in engines]
    optimizers = [chain.build(p, engine) for p, engine in zip(params, engines, strict=True)]
    for k, g in enumerate(grads):
        for opt in optimizers:
            opt.step([x.clone() for x in g])
        if k % 50 == 0 or k == len(grads) - 1:
            for opt, p in zip(optimizers[1:], params[1:], strict=True):
                assert_bitwise_equal(optimizers[0], params[0], opt, p)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_step_equals_apply_updates(chain: Chain, engine: str) -> None:
    init, grads = make_problem(11, steps=30)
    _step_equals_apply_updates(chain, engine, init, grads)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", LARGE_CHAINS, ids=[c.id or c.rule for c in LARGE_CHAINS])
def test_step_equals_apply_updates_large(chain: Chain, engine: str) -> None:
    # Several foreach chunks: step() writes chunk by chunk, updates() collects them all first.
    init, grads = make_problem(11, steps=5, shapes=LARGE_SHAPES)
    _step_equals_apply_updates(chain, engine, init, grads)


def _step_equals_apply_updates(
    chain: Chain, engine: str, init: list[torch.Tensor], grads: list[list[torch.Tensor]]
) -> None:
    pa, pb = leaves(init), leaves(init)
    a, b = chain.build(pa, engine), chain.build(pb, engine)
    for g in grads:
        a.step(g)
        apply_updates(b.updates(g))
    assert_bitwise_equal(a, pa, b, pb)


def _shares_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_updates_dict(chain: Chain, engine: str) -> None:
    init, grads = make_problem(12, steps=4)
    params = leaves(init)
    opt = chain.build(params, engine)
    for k, g in enumerate(grads):
        if k == 0:
            # First call, no state yet: the zero state it creates is part of the dictionary.
            upd = opt.updates(g)
            assert all(p.detach().equal(p0) for p, p0 in zip(params, init, strict=True)), "updates() wrote a parameter"
            assert all(torch.count_nonzero(v) == 0 for state in opt.state.values() for v in state.values()), (
                "updates() wrote state"
            )
        before = snapshot(opt)
        upd = opt.updates(g)
        after = snapshot(opt)
        assert len(before) == len(after)
        assert all(x.equal(y) for x, y in zip(before, after, strict=True)), (
            "updates() wrote a parameter or state tensor"
        )

        expected = list(params) + [t for p in params for t in opt.state[p].values()]
        keys = list(upd)
        assert len(keys) == len(expected) == len({id(t) for t in expected})
        assert {id(t) for t in keys} == {id(t) for t in expected}, "keys must be the parameters and state tensors"
        for target, value in upd.items():
            assert isinstance(value, torch.Tensor)
            assert value.shape == target.shape and value.dtype == target.dtype
            # A value is a new tensor: editing it in place (as one edits an update dictionary) writes nothing.
            assert not any(_shares_memory(value, t) for t in expected), "a proposed value aliases a live tensor"
        opt.step(g)


# --- float32 ------------------------------------------------------------------------------------


def run_float32_against_reference(
    opt: torchupdates.Optimizer,
    params: Sequence[torch.Tensor],
    ref: ReferenceOptimizer,
    grads: Sequence[Sequence[torch.Tensor]],
) -> None:
    """Steps ``opt`` and its float64 reference together; float32 must stay float32 everywhere, the
    proposed values of an update dictionary included."""
    for g in grads:
        for target, value in opt.updates(g).items():
            assert value.dtype == target.dtype, f"proposed {value.dtype} for a {target.dtype} tensor"
        opt.step(g)
        ref.step(as_numpy(g))
    for p in params:
        assert p.dtype == torch.float32
        for key, value in opt.state[p].items():
            assert value.dtype == (torch.int64 if key == "step" else torch.float32), key
    assert_matches_reference(opt, params, ref, rtol=RTOL32, atol_scale=ATOL32)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chain", CHAINS, ids=CHAIN_IDS)
def test_float32_stays_float32(chain: Chain, engine: str) -> None:
    init, grads = make_problem(13, dtype=torch.float32)
    params = leaves(init)
    opt = chain.build(params, engine)
    ref = chain.reference(init)  # float64, from the same (float32-representable) values
    run_float32_against_reference(opt, params, ref, grads)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_float32_with_float64_tensor_hyperparameters(rule: str, engine: str) -> None:
    # 0-d float64 hyperparameters must not promote float32 arithmetic (torch promotes between two
    # 0-d tensors to the wider dtype, so the 0-d parameter is the one at risk).
    init, grads = make_problem(16, steps=20, dtype=torch.float32)
    params = leaves(init)
    values = {**DEFAULTS[rule], **CUSTOM[rule]}
    tensors = {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}
    opt = getattr(torchupdates, rule)(params, **tensors, engine=engine)
    opt = torchupdates.apply_nesterov_momentum(opt, momentum=torch.tensor(0.5, dtype=torch.float64))
    ref = ReferenceOptimizer(as_numpy(init), rule, values).add_modifier(
        "apply_nesterov_momentum", None, {"momentum": 0.5}
    )
    run_float32_against_reference(opt, params, ref, grads)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_0d_parameter_computes_like_any_other(rule: str, engine: str) -> None:
    # The arithmetic is elementwise in the parameter's dtype: N float32 0-d parameters must evolve
    # bit for bit like one float32 vector of the same N values, also when every hyperparameter is a
    # float64 0-d tensor (between 0-d tensors torch promotes to the wider dtype, which would
    # silently run a 0-d parameter's step in float64).
    n, rng = 64, np.random.default_rng(17)
    init = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
    scalars = [x.clone().requires_grad_(True) for x in init]
    vector = init.clone().requires_grad_(True)
    values = {**DEFAULTS[rule], **CUSTOM[rule]}
    opt = getattr(torchupdates, rule)(
        [*scalars, vector], **{k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}, engine=engine
    )
    for _ in range(20):
        g = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
        opt.step([*g.unbind(), g])
    got = torch.stack([x.detach() for x in scalars])
    assert got.dtype == torch.float32
    mismatches = int((got != vector.detach()).sum())
    assert mismatches == 0, f"{mismatches} of {n} 0-d parameters differ from the same values in a vector"
    for key, value in opt.state[vector].items():
        if key != "step":
            stacked = torch.stack([opt.state[x][key] for x in scalars])
            assert stacked.dtype == torch.float32 and torch.equal(stacked, value), key


@pytest.mark.parametrize("rule", RULES)
def test_engines_agree_bitwise_float32_tensor_hyperparameters(rule: str) -> None:
    # Not only float64: each operation is one IEEE operation in the parameter's dtype in both engines.
    init, grads = make_problem(18, steps=40, dtype=torch.float32)
    values = {**DEFAULTS[rule], **CUSTOM[rule]}
    runs = []
    for engine in ["reference", "foreach", *(["compiled"] if compiler_available() else [])]:
        params = leaves(init)
        hyper = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
        opt = torchupdates.apply_momentum(getattr(torchupdates, rule)(params, **hyper, engine=engine), params[:2])
        for g in grads:
            opt.step(g)
        runs.append((opt, params))
    for run in runs[1:]:
        assert_bitwise_equal(*runs[0], *run)


# --- tensor hyperparameters changed in place -------------------------------------------------------

CHANGES: dict[str, dict[str, float]] = {  # multiply by these between the two halves of the run
    "learning_rate": 0.1,
    "epsilon": 100.0,
    "rho": 0.5,
    "beta1": 0.5,
    "beta2": 0.95,
    "momentum": 0.5,
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rule", RULES)
def test_tensor_hyperparameters_changed_in_place(rule: str, engine: str) -> None:
    init, grads = make_problem(14)
    params = leaves(init)
    values = {**DEFAULTS[rule], **CUSTOM[rule]}
    tensors = {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}
    opt = getattr(torchupdates, rule)(params, **tensors, engine=engine)
    # The modifier's momentum as a tensor as well, on a subset.
    mom = torch.tensor(0.6, dtype=torch.float64)
    opt = torchupdates.apply_momentum(opt, params[1:3], momentum=mom)
    ref = ReferenceOptimizer(as_numpy(init), rule, values).add_modifier("apply_momentum", (1, 2), {"momentum": 0.6})
    modifier_stage = len(ref.stages) - 1
    half = len(grads) // 2
    for k, g in enumerate(grads):
        if k == half:
            for name, tensor in tensors.items():
                tensor.mul_(CHANGES[name])
                # momentum / nesterov_momentum keep their momentum in their own modifier stage.
                ref.set_hyper(1 if name == "momentum" else 0, name, float(tensor))
            mom.mul_(CHANGES["momentum"])
            ref.set_hyper(modifier_stage, "momentum", float(mom))
        opt.step(g)
        ref.step(as_numpy(g))
        if k == half:  # the change shows at the very next step
            assert_matches_reference(opt, params, ref, where=f"step {k + 1}")
    assert_matches_reference(opt, params, ref)


@pytest.mark.parametrize(("rule", "key"), [("adam", "m"), ("rmsprop", "accu"), ("nesterov_momentum", "velocity")])
def test_gradients_sharing_memory_with_the_optimizer_state(rule: str, key: str) -> None:
    # A step writes results into parameters and state once their old values are no longer read;
    # gradients that are the state's own memory must still be read as they were.
    init = [torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4), torch.tensor(0.5, dtype=torch.float64)]
    expected, actual = leaves(init), leaves(init)
    hyper = REQUIRED.get(rule, {})
    reference = getattr(torchupdates, rule)(expected, engine="reference", **hyper)
    optimizer = getattr(torchupdates, rule)(actual, engine="foreach", **hyper)
    first = [torch.full_like(p, 0.25) for p in init]
    reference.step(first)
    optimizer.step(first)
    for _ in range(3):
        reference.step([reference.state[p][key].clone() for p in expected])
        optimizer.step([optimizer.state[p][key] for p in actual])
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)
