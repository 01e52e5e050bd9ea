"""``torch.compile`` of a user's training step that calls ``opt.step()``, and of ``opt.step``.

The reference is the eager run of the same optimizer from the same start (the eager engines
are checked against NumPy elsewhere); the yardstick is torch.optim's own gap between a
compiled and an eager ``Adam`` on the same model, measured here. A small MLP, 4 steps; each
test starts from a fresh dynamo cache, and compiles as little as it can (each compile costs
seconds on a small CPU machine).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

import torchupdates
from torchupdates.engines import ENGINES
from torchupdates.registry import RULE_NAMES as RULES


def _inductor_can_compile() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # Inductor raises its own error when no C++ compiler is found
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _inductor_can_compile(), reason="torch.compile (Inductor) needs a C++ compiler on CPU and none was found"
)

LEARNING_RATES = {"adagrad": 0.1, "adadelta": 1.0}
STEPS = 4
FLOAT32_BOUND = 1e-6  # torch.optim's compiled Adam is about 4e-7 from its eager run here
FLOAT64_BOUND = 1e-12

Build = Callable[[list[torch.Tensor], str], torch.optim.Optimizer]


def _rule(name: str) -> Build:
    return lambda params, engine: getattr(torchupdates, name)(params, LEARNING_RATES.get(name, 0.01), engine=engine)


CHAINS: dict[str, Build] = {
    **{rule: _rule(rule) for rule in RULES},
    "nesterov(adam)": lambda p, engine: torchupdates.apply_nesterov_momentum(torchupdates.adam(p, 0.01, engine=engine)),
    "momentum(rmsprop, subset)": lambda p, engine: torchupdates.apply_momentum(
        torchupdates.rmsprop(p, 0.01, engine=engine), params=p[:2], momentum=0.5
    ),
    "momentum(nesterov(amsgrad))": lambda p, engine: torchupdates.apply_momentum(
        torchupdates.apply_nesterov_momentum(torchupdates.amsgrad(p, 0.01, engine=engine)), momentum=0.5
    ),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def mlp(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype) * 0.5)
    x = torch.randn(16, 4, generator=generator, dtype=dtype)
    return model, x, torch.randn(16, 1, generator=generator, dtype=dtype)


def train(build: Callable[[list[torch.Tensor]], torch.optim.Optimizer], compiled: bool, dtype=torch.float32):
    """The user's training step, compiled whole or eager: (model parameters, optimizer)."""
    model, x, y = mlp(dtype)
    opt = build(list(model.parameters()))

    def step() -> torch.Tensor:
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    run = torch.compile(step) if compiled else step
    for _ in range(STEPS):
        run()
    return list(model.parameters()), opt


def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


def state_gap(opt_a, params_a, opt_b, params_b) -> float:
    gaps = [0.0]
    for pa, pb in zip(params_a, params_b, strict=True):
        assert opt_a.state[pa].keys() == opt_b.state[pb].keys()
        a, b = opt_a.state[pa], opt_b.state[pb]
        gaps += [float((a[key].double() - b[key].double()).abs().max()) for key in a]
    return max(gaps)


@pytest.fixture(scope="module")
def torch_optim_gap() -> float:
    """torch.optim.Adam's own distance between a compiled and an eager training run."""
    torch._dynamo.reset()
    runs = [train(lambda p: torch.optim.Adam(p, lr=0.01), compiled)[0] for compiled in (True, False)]
    return gap(*runs)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_compiled_training_step_follows_the_eager_one(chain: str, torch_optim_gap: float) -> None:
    compiled, opt_c = train(lambda p: CHAINS[chain](p, "foreach"), compiled=True)
    eager, opt_e = train(lambda p: CHAINS[chain](p, "foreach"), compiled=False)
    assert torch_optim_gap < FLOAT32_BOUND  # the yardstick: torch.optim's own gap is of this order
    assert gap(compiled, eager) <= FLOAT32_BOUND
    assert state_gap(opt_c, compiled, opt_e, eager) <= FLOAT32_BOUND
    counts = {k: int(v) for p in compiled for k, v in opt_c.state[p].items() if k.startswith("step")}
    assert all(count == STEPS for count in counts.values())


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_compiled_step_is_one_graph_on_every_engine(engine: str) -> None:
    """torch.compile(opt.step, fullgraph=True) after an eager backward: one graph for all steps."""
    runs = []
    for compiled in (True, False):
        model, x, y = mlp()
        params = list(model.parameters())
        opt = CHAINS["momentum(rmsprop, subset)"](params, engine)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(STEPS):
            ((model(x) - y) ** 2).mean().backward()
            step()
            opt.zero_grad()
        runs.append((opt, params))
        if compiled:  # (the eager run of engine="compiled" compiles kernels of its own)
            assert counters["stats"]["unique_graphs"] == 1
    (opt_c, compiled_params), (opt_e, eager_params) = runs
    assert gap(compiled_params, eager_params) <= FLOAT32_BOUND
    assert state_gap(opt_c, compiled_params, opt_e, eager_params) <= FLOAT32_BOUND


@pytest.mark.parametrize(
    "options",
    [
        {"skip_nonfinite": True},
        {"skip_nonfinite": True, "max_grad_norm": 0.5},
        {"skip_nonfinite": True, "max_grad_norm": torch.tensor(0.5)},  # its value is not read when traced
    ],
    ids=["skip", "skip+clip", "skip+tensor clip"],
)
def test_guards_trace_into_one_graph_and_skip_on_the_device(options: dict[str, object]) -> None:
    """skip_nonfinite decides on the device when traced (no host read, so fullgraph=True holds):
    a NaN batch writes nothing, is counted, and the run equals the eager one; grad_norm is kept."""
    runs = []
    for compiled in (True, False):
        model, x, y = mlp()
        params = list(model.parameters())
        opt = torchupdates.apply_momentum(torchupdates.adam(params, 0.01, **options), params[:2])
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for k in range(STEPS):
            ((model(x) - y) ** 2).mean().backward()
            if k == 2:
                params[0].grad[0, 1] = float("nan")
                before = [p.detach().clone() for p in params] + [
                    t.clone() for p in params for t in opt.state[p].values()
                ]
            step()
            if k == 2:
                after = [p.detach() for p in params] + [t for p in params for t in opt.state[p].values()]
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "a skipped step wrote"
            opt.zero_grad()
        runs.append((opt, params))
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1
    (opt_c, compiled_params), (opt_e, eager_params) = runs
    assert opt_c.skipped_steps == opt_e.skipped_steps == 1
    assert opt_c.state_dict()["skipped_steps"] == 1
    assert gap(compiled_params, eager_params) <= FLOAT32_BOUND
    assert state_gap(opt_c, compiled_params, opt_e, eager_params) <= FLOAT32_BOUND
    if "max_grad_norm" in options:
        assert opt_c.grad_norm is not None and opt_e.grad_norm is not None
        assert abs(float(opt_c.grad_norm) - float(opt_e.grad_norm)) <= FLOAT32_BOUND * float(opt_e.grad_norm)


def test_float64_follows_the_eager_run_within_1e_12() -> None:
    def build(p):
        return CHAINS["momentum(nesterov(amsgrad))"](p, "foreach")

    compiled, opt_c = train(build, compiled=True, dtype=torch.float64)
    eager, opt_e = train(build, compiled=False, dtype=torch.float64)
    assert gap(compiled, eager) <= FLOAT64_BOUND
    assert state_gap(opt_c, compiled, opt_e, eager) <= FLOAT64_BOUND


def test_changed_hyperparameters_take_effect_in_a_compiled_step() -> None:
    """A scheduler's new lr (a number: the step recompiles), a 0-d tensor changed in place (no
    recompile) and torch's "betas" set between compiled steps act as in the eager run."""
    runs = []
    for compiled in (True, False):
        model, x, y = mlp()
        params = list(model.parameters())
        beta2 = torch.tensor(0.999)
        opt = torchupdates.adam(
            [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], 0.01, beta2=beta2, engine="foreach"
        )
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        # (the scheduler wraps opt.step in a function dynamo does not trace: not fullgraph)
        step = torch.compile(opt.step) if compiled else opt.step
        for k in range(STEPS):
            ((model(x) - y) ** 2).mean().backward()
            step()
            opt.zero_grad()
            scheduler.step()
            if k == 0:
                beta2.fill_(0.9)
            if k == 1:
                opt.param_groups[1]["betas"] = (0.5, beta2)
        assert opt.param_groups[1]["beta1"] == 0.5 and opt.param_groups[1]["betas"] == (0.5, beta2)
        runs.append((opt, params))
    (opt_c, compiled_params), (opt_e, eager_params) = runs
    assert gap(compiled_params, eager_params) <= FLOAT32_BOUND
    assert state_gap(opt_c, compiled_params, opt_e, eager_params) <= FLOAT32_BOUND
    # The first graph; one for the step that takes the new lr and moves "betas" into beta1; one
    # for the steps after it (beta1 is a new number). The tensor changed in place compiles nothing.
    assert counters["stats"]["unique_graphs"] == 3


def test_tensor_learning_rate_changed_in_place_needs_no_recompile() -> None:
    """A 0-d tensor lr is an input of the compiled step: halved after every step, one graph."""
    runs = []
    for compiled in (True, False):
        model, x, y = mlp()
        params = list(model.parameters())
        lr = torch.tensor(0.01)
        opt = CHAINS["nesterov(adam)"](params, "reference")
        opt.param_groups[0]["lr"] = lr
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(STEPS):
            ((model(x) - y) ** 2).mean().backward()
            step()
            opt.zero_grad()
            lr.mul_(0.5)
        runs.append(params)
    assert counters["stats"]["unique_graphs"] == 1
    assert gap(*runs) <= FLOAT32_BOUND
