"""The step guards (``skip_nonfinite``, ``max_grad_norm``, ``apply_norm_constraint``) inside
the training loops that surround a step: ``torch.amp.GradScaler``, ``torch.optim.lr_scheduler``
and checkpoints.

GradScaler. The optimizers do not declare ``_step_supports_amp_scaling``, so GradScaler takes
its generic path: ``unscale_`` divides ``.grad`` in place and records whether any gradient is
non-finite, and ``scaler.step`` calls ``opt.step()`` only when none is. A step therefore sees the
unscaled gradients (``max_grad_norm`` clips those), and an overflowing batch never reaches the
optimizer: neither ``skipped_steps`` nor ``grad_norm`` changes, GradScaler halves its scale.

Schedulers. A step skipped by ``skip_nonfinite`` is still a call of ``opt.step()``: the loop goes
on to call ``sched.step()``, so the schedule advances by iteration, not by steps taken (the
step after a skipped batch uses the next iteration's learning rate, and Adam's bias correction
counts only the steps taken).

The loss of every loop here is ``sum(p**2 / 2 + c * p)`` with per-batch data ``c``: its gradient
``p + c`` depends on the parameters, and the NumPy reference computes it the same way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, StepLR

import torchupdates as updates
from compiler import needs_compiler
from numpy_reference import ReferenceOptimizer
from test_exactness import REQUIRED, assert_bitwise_equal, assert_matches_reference, leaves, make_problem, snapshot
from torchupdates.registry import RULE_NAMES as RULES

EAGER = ["foreach", "reference"]
STEPS = 8
MAX_GRAD_NORM = 10.0
# Batches alternate between large data (clipped: joint gradient norm ~ 30) and small (~ 6: not).
DATA_SCALES = [1.0, 0.05]
TOTAL_NORM_EPSILON = 1e-7  # total_norm_constraint's default


def batches(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    init, data = make_problem(seed, STEPS, dtype)
    return init, [[c * DATA_SCALES[k % 2] for c in batch] for k, batch in enumerate(data)]


def loss_on(params: Sequence[torch.Tensor], batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((0.5 * p.square().sum() + (c * p).sum() for p, c in zip(params, batch, strict=True)), torch.zeros(()))


def poisoned(batch: list[torch.Tensor], value: float) -> list[torch.Tensor]:
    bad = [c.clone() for c in batch]
    bad[2].view(-1)[5] = value
    return bad


def np_gradients(ref: ReferenceOptimizer, batch: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [p + c.to(torch.float64).numpy() for p, c in zip(ref.params, batch, strict=True)]


def np_total_norm_constraint(grads: list[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], float]:
    """Lasagne's ``total_norm_constraint``: ``g * clip(n, 0, max_norm) / (epsilon + n)``."""
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads))
    return [g * (min(norm, max_norm) / (TOTAL_NORM_EPSILON + norm)) for g in grads], norm


def hyper(rule: str) -> dict[str, float]:
    return REQUIRED.get(rule, {"learning_rate": 0.05})


def all_tensors(opt: updates.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + snapshot(opt)


def assert_unchanged(before: list[torch.Tensor], opt: updates.Optimizer, params: Sequence[torch.Tensor]) -> None:
    after = all_tensors(opt, params)
    assert len(before) == len(after)
    for i, (x, y) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(x, y), f"tensor {i} changed by a skipped batch"


# --- GradScaler ----------------------------------------------------------------------------------


def test_grad_scaler_takes_its_generic_path_on_cpu() -> None:
    # Enabled, or every GradScaler loop below would be a plain loop and prove nothing.
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    assert float(scaler.scale(torch.ones((), dtype=torch.float64))) == 2.0**16
    # The flag would make GradScaler hand the unscaling and the inf check to step() (found_inf,
    # grad_scale), which ignores them: the scaled gradients would be applied.
    opt = updates.adam([torch.zeros(2, requires_grad=True)])
    assert not getattr(opt, "_step_supports_amp_scaling", False)


def scaled_iteration(
    opt: updates.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor, unscale: bool, set_to_none: bool = True
) -> None:
    """GradScaler's documented iteration (``unscale_`` optional: ``scaler.step`` then does it)."""
    opt.zero_grad(set_to_none=set_to_none)
    scaler.scale(loss).backward()
    if unscale:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


# "skip, .grad kept": zero_grad(set_to_none=False) and no clipping, so that GradScaler unscales
# the same .grad tensors in place every iteration; on the compiled engine these are views of its
# flat buffers, and it steps from them without rebuilding anything (its steady state).
GUARDS: dict[str, tuple[dict[str, Any], bool]] = {
    "clip+skip": ({"skip_nonfinite": True, "max_grad_norm": MAX_GRAD_NORM}, True),
    "skip, .grad kept": ({"skip_nonfinite": True}, False),
}
GRAD_SCALER_CASES = [
    *[
        (rule, engine, dtype, guards)
        for rule in RULES
        for engine in EAGER
        for dtype in (torch.float64, torch.float32)
        for guards in GUARDS
    ],
    *[pytest.param("adam", "compiled", torch.float32, guards, marks=needs_compiler) for guards in GUARDS],
]


@pytest.mark.parametrize(("rule", "engine", "dtype", "guards"), GRAD_SCALER_CASES, ids=str)
def test_grad_scaler_loop_equals_the_unscaled_loop(rule: str, engine: str, dtype: torch.dtype, guards: str) -> None:
    # Powers of two scale and unscale exactly, so the scaled loop must be the unscaled one bit
    # for bit, while the scale grows (growth_interval=2) and is cut back by an overflow.
    overflow = 3
    options, set_to_none = GUARDS[guards]
    init, data = batches(dtype)
    # Finite before scaling, infinite after: an overflow only GradScaler sees.
    data[overflow] = poisoned(data[overflow], torch.finfo(dtype).max / 2**8)
    scaled_params, plain_params = leaves(init), leaves(init)
    scaled = getattr(updates, rule)(scaled_params, **hyper(rule), engine=engine, **options)
    plain = getattr(updates, rule)(plain_params, **hyper(rule), engine=engine, **options)
    steps_called = []
    scaled.register_step_pre_hook(lambda *_: steps_called.append(True))
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    scales = []
    for k, batch in enumerate(data):
        before, norm_before = all_tensors(scaled, scaled_params), scaled.grad_norm
        scaled_iteration(scaled, scaler, loss_on(scaled_params, batch), unscale=True, set_to_none=set_to_none)
        scales.append(scaler.get_scale())
        if k == overflow:
            assert len(steps_called) == k, "GradScaler called step() on an overflowing batch"
            assert scaled.grad_norm is norm_before and scaled.skipped_steps == 0
            assert_unchanged(before, scaled, scaled_params)
            continue
        plain.zero_grad(set_to_none=set_to_none)
        loss_on(plain_params, batch).backward()
        plain.step()
        if plain.grad_norm is not None:
            assert scaled.grad_norm is not None and torch.equal(scaled.grad_norm, plain.grad_norm)
    assert len(steps_called) == STEPS - 1
    # growth_interval=2: doubled after every second finite batch, halved by the overflow.
    assert scales == [2.0**16, 2.0**17, 2.0**17, 2.0**16, 2.0**16, 2.0**17, 2.0**17, 2.0**18]
    assert_bitwise_equal(scaled, scaled_params, plain, plain_params)


@pytest.mark.parametrize("unscale", [True, False], ids=["unscale_", "unscaled-by-step"])
@pytest.mark.parametrize("engine", EAGER)
@pytest.mark.parametrize("rule", RULES)
def test_clipping_under_grad_scaler_sees_the_unscaled_gradients(rule: str, engine: str, unscale: bool) -> None:
    init, data = batches(torch.float64, seed=1)
    params = leaves(init)
    opt = getattr(updates, rule)(params, **hyper(rule), engine=engine, max_grad_norm=MAX_GRAD_NORM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    ref = ReferenceOptimizer([t.numpy() for t in init], rule, hyper(rule))
    norms = []
    for batch in data:
        expected_grads = np_gradients(ref, batch)
        scaled_iteration(opt, scaler, loss_on(params, batch), unscale)
        assert opt.grad_norm is not None
        # GradScaler unscaled .grad in place before the step; the step clipped a copy.
        unscaled = [torch.clone(p.grad) for p in params if p.grad is not None]
        assert len(unscaled) == len(params)
        for got, want in zip(unscaled, expected_grads, strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-13, atol=1e-13)
        assert torch.equal(opt.grad_norm, updates.total_norm_constraint(unscaled, MAX_GRAD_NORM, return_norm=True)[1])
        clipped, norm = np_total_norm_constraint(expected_grads, MAX_GRAD_NORM)
        np.testing.assert_allclose(float(opt.grad_norm), norm, rtol=1e-13)
        norms.append(norm)
        ref.step(clipped)
    assert max(norms) > MAX_GRAD_NORM > min(norms), "both clipped and unclipped steps are needed"
    assert_matches_reference(opt, params, ref)


# --- schedulers ----------------------------------------------------------------------------------


def one_cycle(k: int, max_lr: float, total: int) -> tuple[float, float]:
    """OneCycleLR's documented default schedule (cosine, two phases, peak at 30%) at iteration
    ``k``: the learning rate and the momentum (beta1 for the Adam family)."""
    initial, peak = max_lr / 25, 0.3 * total - 1

    def anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    if k <= peak:
        return anneal(initial, max_lr, k / peak), anneal(0.95, 0.85, k / peak)
    pct = (k - peak) / (total - 1 - peak)
    return anneal(max_lr, initial / 1e4, pct), anneal(0.85, 0.95, pct)


@dataclass(frozen=True)
class ScheduleCase:
    """A rule, a torch scheduler on it, and the same schedule written out: iteration ->
    (learning rate, value of the cycled momentum hyperparameter ``momentum_key`` or None)."""

    rule: str
    make: Callable[[updates.Optimizer], LRScheduler]
    schedule: Callable[[int], tuple[float, float | None]]
    momentum_key: str | None = None
    bad: int = 3  # the iteration whose batch holds a NaN


SCHEDULES = {
    "StepLR(rmsprop)": ScheduleCase(
        "rmsprop", lambda opt: StepLR(opt, step_size=2, gamma=0.5), lambda k: (0.05 * 0.5 ** (k // 2), None)
    ),
    # The NaN batch comes first: torch must still see a step before the first sched.step().
    "LambdaLR(momentum)": ScheduleCase(
        "momentum", lambda opt: LambdaLR(opt, lambda k: 1 / (1 + k)), lambda k: (0.05 * (1 / (1 + k)), None), bad=0
    ),
    "OneCycleLR(adam)": ScheduleCase(
        "adam",
        lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=STEPS),
        lambda k: one_cycle(k, 0.1, STEPS),
        momentum_key="beta1",
    ),
    "OneCycleLR(nesterov_momentum)": ScheduleCase(
        "nesterov_momentum",
        lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=STEPS),
        lambda k: one_cycle(k, 0.1, STEPS),
        momentum_key="momentum",
    ),
}


@pytest.mark.filterwarnings("error:Detected call of:UserWarning")
@pytest.mark.parametrize("engine", EAGER)
@pytest.mark.parametrize("case", list(SCHEDULES))
def test_scheduler_drives_the_guarded_step(case: str, engine: str) -> None:
    spec = SCHEDULES[case]
    init, data = batches(torch.float64, seed=2)
    data[spec.bad] = poisoned(data[spec.bad], float("nan"))
    params = leaves(init)
    opt = getattr(updates, spec.rule)(
        params, **hyper(spec.rule), engine=engine, skip_nonfinite=True, max_grad_norm=MAX_GRAD_NORM
    )
    sched = spec.make(opt)
    ref = ReferenceOptimizer([t.numpy() for t in init], spec.rule, hyper(spec.rule))
    # The momentum of sgd + momentum lives in the modifier, the reference's stage 1.
    momentum_stage = 1 if spec.momentum_key == "momentum" else 0
    for k, batch in enumerate(data):
        lr, momentum = spec.schedule(k)
        before = all_tensors(opt, params)
        opt.zero_grad()
        loss_on(params, batch).backward()
        opt.step()
        sched.step()
        if k == spec.bad:
            # The norm of the NaN batch: grad_norm is set before the finiteness check.
            assert opt.grad_norm is not None and math.isnan(float(opt.grad_norm))
            assert_unchanged(before, opt, params)
            continue
        ref.set_hyper(0, "learning_rate", lr)
        if spec.momentum_key is not None and momentum is not None:
            ref.set_hyper(momentum_stage, spec.momentum_key, momentum)
        ref.step(np_total_norm_constraint(np_gradients(ref, batch), MAX_GRAD_NORM)[0])
    assert opt.skipped_steps == 1
    assert sched.last_epoch == STEPS  # one sched.step() per iteration, the skipped one included
    lr, momentum = spec.schedule(STEPS)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-13)
    if spec.momentum_key == "beta1":
        assert opt.param_groups[0]["betas"][0] == pytest.approx(momentum, rel=1e-13)
    elif spec.momentum_key is not None:
        assert opt.param_groups[0][spec.momentum_key] == pytest.approx(momentum, rel=1e-13)
    assert_matches_reference(opt, params, ref)


# --- checkpoints ---------------------------------------------------------------------------------


class Loop:
    """Parameters, a guarded and constrained optimizer chain, a scheduler cycling its beta1 and
    a GradScaler (disabled: a plain loop): what a checkpoint of a training run holds."""

    def __init__(self, init: Sequence[torch.Tensor], engine: str, scaled: bool) -> None:
        self.params = leaves(init)
        opt = updates.adam(self.params, 0.01, engine=engine, skip_nonfinite=True, max_grad_norm=MAX_GRAD_NORM)
        opt = updates.apply_nesterov_momentum(opt, momentum=0.5)
        self.opt = updates.apply_norm_constraint(opt, 1.5, params=self.params[2:])
        self.sched = OneCycleLR(self.opt, max_lr=0.05, total_steps=STEPS)
        self.scaler = torch.amp.GradScaler("cpu", growth_interval=2, enabled=scaled)

    def run(self, batches: Sequence[list[torch.Tensor]]) -> None:
        for batch in batches:
            scaled_iteration(self.opt, self.scaler, loss_on(self.params, batch), unscale=True)
            self.sched.step()

    def save(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "params": [p.detach() for p in self.params],
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def load(cls, saved: bytes, engine: str, scaled: bool) -> Loop:
        checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
        loop = cls(checkpoint["params"], engine, scaled)
        loop.opt.load_state_dict(checkpoint["opt"])
        loop.sched.load_state_dict(checkpoint["sched"])
        loop.scaler.load_state_dict(checkpoint["scaler"])
        return loop


CHECKPOINT_CASES = [
    (engine, dtype, scaled) for engine in EAGER for dtype in (torch.float64, torch.float32) for scaled in (False, True)
]


@pytest.mark.parametrize(("engine", "dtype", "scaled"), CHECKPOINT_CASES, ids=str)
def test_a_resumed_run_equals_the_uninterrupted_one(engine: str, dtype: torch.dtype, scaled: bool) -> None:
    # NaN batches before and after the checkpoint: without GradScaler skip_nonfinite skips them
    # (and skipped_steps must survive); with it GradScaler does (and its scale must survive).
    init, data = batches(dtype, seed=3)
    middle = STEPS // 2
    for bad in (2, 6):
        data[bad] = poisoned(data[bad], float("nan"))
    whole = Loop(init, engine, scaled)
    whole.run(data)
    first = Loop(init, engine, scaled)
    first.run(data[:middle])
    assert first.opt.skipped_steps == (0 if scaled else 1)
    resumed = Loop.load(first.save(), engine, scaled)
    assert resumed.opt.skipped_steps == first.opt.skipped_steps
    resumed.run(data[middle:])
    assert resumed.opt.skipped_steps == whole.opt.skipped_steps == (0 if scaled else 2)
    assert_bitwise_equal(resumed.opt, resumed.params, whole.opt, whole.params)
    assert whole.opt.grad_norm is not None and resumed.opt.grad_norm is not None
    assert torch.equal(resumed.opt.grad_norm, whole.opt.grad_norm)
    for mine, theirs in zip(resumed.opt.param_groups, whole.opt.param_groups, strict=True):
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    assert resumed.sched.last_epoch == whole.sched.last_epoch == STEPS
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()
    if scaled:
        # Doubled after every second finite batch, halved by each NaN batch (2**20 had it not
        # seen them).
        assert whole.scaler.get_scale() == 2.0**16
    # The constraint is in force: rows of norm 3 to 4 at the start, which steps of this size
    # alone would not bring under 1.5.
    for p in whole.params[2:]:
        assert float(torch.linalg.vector_norm(p.detach().flatten(1), dim=1).max()) <= 1.5
