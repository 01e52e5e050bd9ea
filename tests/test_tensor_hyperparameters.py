"""0-d tensor hyperparameters with float16 and bfloat16 parameters: every engine, ``step`` and
``apply_updates(updates(...))`` agree bit for bit, and with the NumPy emulation of eager 16-bit
torch in ``test_sixteen_bit``.

Eager torch on CPU rounds a 0-d tensor scalar by its position: a float16 ``g`` times a float32
0-d ``s`` is computed in float32 from ``s`` itself as ``g * s``, but from ``s`` rounded to float16
as ``s * g``. The formulas write ``learning_rate * grad``; the recording holds every scalar as the
second operand, which is how the multi-tensor and compiled kernels take it, while the reference
engine ran the formula on the tensors themselves. So with float32 tensor hyperparameters and
16-bit parameters it disagreed with the other engines. The defined result is the recorded one:
the scalar second, so that a tensor hyperparameter acts as the number it holds.

The emulation computes the coefficients (``1 - rho``, Adam's bias correction) as torch computes
them from 0-d tensors, each operation rounded to the tensor's dtype (:class:`Held`). Powers it
does not emulate: the betas here have powers that every format holds exactly (0.5, 0.75).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import torchupdates
from compiler import needs_compiler
from test_sixteen_bit import (  # noqa: F401 (small_chunks is a fixture)
    CUSTOM,
    HALF,
    as_torch,
    assert_same_bits,
    bits,
    emulate,
    problem,
    round_to,
    run,
    small_chunks,
)
from torchupdates.registry import RULE_NAMES

FORMATS = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

EXACT_POWERS = {"beta1": 0.5, "beta2": 0.75}
HYPER: dict[str, dict[str, float]] = {
    **CUSTOM,
    "adam": {**CUSTOM["adam"], **EXACT_POWERS},
    "amsgrad": {**CUSTOM["amsgrad"], **EXACT_POWERS},
    "adamax": {**CUSTOM["adamax"], "beta1": 0.75},  # adamax raises only beta1 to the power t
}
"""Mostly values that float16 and bfloat16 cannot hold (0.03, 0.8, 1e-4), so a scalar rounded to
16 bits where eager torch does not round it shows; and betas whose powers are exact."""

CASES = [(rule, None) for rule in RULE_NAMES] + [("rmsprop", "apply_momentum"), ("adam", "apply_nesterov_momentum")]
COMPOSED_MOMENTUM = 0.7


def _rounding(op: Callable[[float, float], float], reflected: bool) -> Callable[[Held, object], Any]:
    def method(self: Held, other: object) -> Any:
        return self._apply(other, op, reflected)

    return method


class Held(float):
    """A hyperparameter held in a 0-d tensor of ``fmt``, as a Python float: its value is the
    tensor's, and its arithmetic with numbers rounds each result to ``fmt`` as torch's 0-d
    tensor arithmetic does (a 16-bit operation is the float32 one rounded once more; a float64
    operation on values of ``fmt`` rounded to ``fmt`` is the IEEE operation in ``fmt``). With
    an array operand it defers to the array (``Eager16`` takes it as a Python number)."""

    fmt: str

    def __new__(cls, value: float, fmt: str) -> Held:
        held = super().__new__(cls, float(round_to(np.array(value, dtype=np.float32), fmt)))
        held.fmt = fmt
        return held

    def _apply(self, other: object, op: Callable[[float, float], float], reflected: bool) -> Any:
        if not isinstance(other, (int, float)):
            return NotImplemented
        # A tensor operand (``sqrt(1 - beta2**t)``) is a value of fmt too; an int is exact.
        mine, theirs = float(self), float(other if isinstance(other, int) else Held(other, self.fmt))
        return Held(op(theirs, mine) if reflected else op(mine, theirs), self.fmt)

    __add__, __radd__ = _rounding(operator.add, False), _rounding(operator.add, True)
    __sub__, __rsub__ = _rounding(operator.sub, False), _rounding(operator.sub, True)
    __mul__, __rmul__ = _rounding(operator.mul, False), _rounding(operator.mul, True)
    __truediv__ = _rounding(operator.truediv, False)

    def __pow__(self, power: object) -> Any:
        assert isinstance(power, int)
        return Held(float(self) ** power, self.fmt)


def test_held_rounds_each_operation() -> None:
    # float32: 1 - 0.9f = 0.100000024 (exact, Sterbenz); times 3 rounds to 0.30000007.
    rho = Held(0.9, "float32")
    assert float(rho) == float(np.float32(0.9))
    assert float(1 - rho) == float(np.float32(1) - np.float32(0.9))
    assert float((1 - rho) * 3) == float(np.float32(np.float32(1) - np.float32(0.9)) * np.float32(3))
    # float16: 0.3 is 1229 / 4096 (steps of 2**-12 in [0.25, 0.5)); its square root 0.5477671 is
    # 1122 / 2048 in float16 (1121.83 steps of 2**-11); their product 0.16438222 is 1347 / 8192.
    lr = Held(0.3, "float16")
    assert float(lr) == 1229 / 4096
    assert float(lr * math.sqrt(lr)) == 1347 / 8192


def as_tensors(hyper: dict[str, float], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=dtype) for key, value in hyper.items()}


def as_held(hyper: dict[str, float], dtype: torch.dtype) -> dict[str, float]:
    return {key: Held(value, FORMATS[dtype]) for key, value in hyper.items()}


def hyper_of(rule: str, modifier: str | None) -> dict[str, float]:
    return {**HYPER[rule], **({"momentum": COMPOSED_MOMENTUM} if modifier else {})}


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("held", ["float32", "param dtype"], ids=["float32 tensors", "param-dtype tensors"])
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize(("rule", "modifier"), CASES, ids=[f"{m}({r})" if m else r for r, m in CASES])
def test_engines_step_and_updates_match_the_emulation(
    rule: str, modifier: str | None, dtype: torch.dtype, held: str
) -> None:
    hyper_dtype = torch.float32 if held == "float32" else dtype
    hyper = hyper_of(rule, modifier)
    init, grads = problem(dtype, seed=len(rule) + 1)
    tensors = as_tensors(hyper, hyper_dtype)
    runs = {
        (engine, via_updates): run(rule, tensors, modifier, engine, via_updates, init, grads, None)
        for engine in ("reference", "foreach")
        for via_updates in (False, True)
    }
    emulated = emulate(rule, as_held(hyper, hyper_dtype), modifier, init, grads, None)
    expected = as_torch(emulated, runs["foreach", False])
    for (engine, via_updates), got in runs.items():
        assert_same_bits(got, expected, f"{engine} {'apply_updates(updates())' if via_updates else 'step()'}")


@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov_momentum", "adagrad", "rmsprop", "adadelta"])
def test_a_float32_tensor_acts_as_the_number_it_holds(rule: str, dtype: torch.dtype) -> None:
    """Where the coefficients come out the same from a float32 tensor and from a Python number
    (no bias correction; ``1 - rho`` is exact in float32 for rho >= 0.5)."""
    tensors = as_tensors(HYPER[rule], torch.float32)
    numbers = {key: float(value) for key, value in tensors.items()}
    init, grads = problem(dtype, seed=2)
    for engine in ("reference", "foreach"):
        expected = run(rule, numbers, None, engine, False, init, grads, None)
        assert_same_bits(run(rule, tensors, None, engine, False, init, grads, None), expected, engine)


ENGINES = ["reference", "foreach", pytest.param("compiled", marks=needs_compiler)]


@pytest.mark.parametrize("engine", ENGINES)
def test_one_sgd_step_by_hand(engine: str) -> None:
    # p = 0 - 0.1 * g, g = float16(-1.126) = -1.1259765625. Eager torch multiplies by float32(0.1):
    # 0.112597659 -> float16 0.11260986328125. With 0.1 rounded to float16 first (0.0999755859375):
    # 0.112570... -> float16 0.112548828125, one ulp below.
    g16 = np.float16(-1.126)
    exact = np.float16(np.float32(g16) * np.float32(0.1))
    rounded_first = np.float16(np.float32(g16) * np.float32(np.float16(0.1)))
    assert float(-exact) == 0.11260986328125 and float(-rounded_first) == 0.112548828125
    expected = torch.tensor([-float(exact)], dtype=torch.float16)
    for via_updates in (False, True):
        param = torch.zeros(1, dtype=torch.float16, requires_grad=True)
        opt = torchupdates.sgd([param], torch.tensor(0.1), engine=engine)
        grad = torch.tensor([float(g16)], dtype=torch.float16)
        if via_updates:
            torchupdates.apply_updates(opt.updates([grad]))
        else:
            opt.step([grad])
        assert torch.equal(bits(param.detach()), bits(expected)), via_updates


@needs_compiler
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
def test_compiled_engine_matches_the_emulation(dtype: torch.dtype) -> None:
    hyper = HYPER["adam"]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(7, generator=gen).to(dtype), torch.randn(2, 3, generator=gen).to(dtype)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in init] for _ in range(3)]
    tensors = as_tensors(hyper, torch.float32)
    first = run("adam", tensors, None, "compiled", False, init, grads, None)
    expected = as_torch(emulate("adam", as_held(hyper, torch.float32), None, init, grads, None), first)
    assert_same_bits(first, expected, "compiled step()")
    assert_same_bits(run("adam", tensors, None, "compiled", True, init, grads, None), expected, "compiled updates()")


# --- float16 and the Adam family's default epsilon --------------------------------------------


@pytest.mark.parametrize("rule", ["adam", "amsgrad", "adamax"])
@pytest.mark.parametrize("engine", ["reference", "foreach"])
def test_float16_default_epsilon_divides_by_zero_as_the_formula_does(rule: str, engine: str) -> None:
    """Documented behaviour, not a fix: 1e-8 is 0 in float16, so a zero denominator stays zero.

    First step, float16, defaults (lr 1e-3 or 2e-3, betas 0.9 and 0.999): a zero gradient gives
    m = v = 0 and 0 / 0 = NaN. For Adam and AMSGrad g = 1e-3 gives v = 0.001 * g**2 = 1e-9, 0 in
    float16, but m = 1e-4, so -a * m / 0 = -inf; g = 0.5 is an ordinary step. Adamax divides by
    max(0, |g|): only the zero gradient fails. torch.optim.Adam gives NaN at a zero gradient too.
    With float32 state the same steps are finite.
    """
    grad = torch.tensor([0.0, 1e-3, 0.5], dtype=torch.float16)
    got = {}
    for state_dtype in (None, torch.float32):
        for via_updates in (False, True):
            param = torch.zeros(3, dtype=torch.float16, requires_grad=True)
            opt = getattr(torchupdates, rule)([param], engine=engine, state_dtype=state_dtype)
            if via_updates:
                torchupdates.apply_updates(opt.updates([grad.clone()]))
            else:
                opt.step([grad.clone()])
            got[state_dtype, via_updates] = param.detach()
    assert torch.equal(bits(got[None, False]), bits(got[None, True]))
    emulated = emulate(rule, {}, None, [torch.zeros(3, dtype=torch.float16)], [[grad]], None)[0]["param"]
    torch.testing.assert_close(got[None, False], torch.from_numpy(emulated).half(), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got[None, False][0])
    if rule == "adamax":
        assert torch.isfinite(got[None, False][1:]).all()
    else:
        assert got[None, False][1] == -torch.inf and torch.isfinite(got[None, False][2])
    assert torch.isfinite(got[torch.float32, False]).all() and torch.isfinite(got[torch.float32, True]).all()
    param = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    param.grad = grad.clone()
    torch.optim.Adam([param], lr=1e-3, foreach=False).step()
    assert torch.isnan(param.detach()[0])


def test_bfloat16_holds_the_default_epsilon() -> None:
    assert float(torch.tensor(1e-8).to(torch.bfloat16)) > 0 and float(torch.tensor(1e-8).half()) == 0
    param = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = torchupdates.adam([param])
    opt.step([torch.tensor([0.0, 1e-3, 0.5], dtype=torch.bfloat16)])
    assert torch.isfinite(param.detach()).all()
