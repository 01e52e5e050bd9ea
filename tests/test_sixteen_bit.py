"""float16 and bfloat16 parameters: every engine, ``step`` and ``apply_updates(updates(...))``
agree bit for bit with an independent NumPy emulation of eager torch (issue 7).

The defined semantics: every recorded operation is one torch operation computed as eager torch
computes it on CPU, in the formula's order. For a 16-bit tensor that is the float32 operation
rounded once to the 16-bit type; a Python-number operand is converted to float32 for ``mul``
and ``div`` but first rounded to the 16-bit type for ``add`` and ``sub`` (torch's CPU kernels
do so). :class:`Eager16` does exactly that in NumPy and runs the formulas of
``numpy_reference`` (written from the design document, not from ``src/``).

An engine may not use a kernel variant that rounds otherwise: torch's in-place
``_foreach_mul_`` on 16-bit CPU tensors rounds its Python-number scalar to the 16-bit type
first (float16 ``-1.126 * 0.1``: eager ``-0.1126``, ``_foreach_mul_`` ``-0.11255``), which made
the foreach engine's update dictionaries differ from its ``step`` for rmsprop, adadelta, adam
and amsgrad (``(1 - rho) * g**2`` multiplied an intermediate in place).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import torchupdates
from compiler import needs_compiler
from numpy_reference import MODIFIERS, RULES
from test_exactness import CUSTOM as EXACTNESS_CUSTOM
from torchupdates import apply_updates
from torchupdates.engines import foreach as foreach_engine
from torchupdates.registry import RULE_NAMES

HALF = [torch.float16, torch.bfloat16]
SHAPES: list[tuple[int, ...]] = [(), (5,), (3, 4), (20000,), (7,), (150,)]
GRAD_SCALES = [1e-3, 1.0, 10.0, 0.1]
STEPS = 4
SMALL_CHUNK = 5000  # the 20,000-element tensor runs in several foreach chunks

# test_exactness's non-default hyperparameters, with epsilons that 16-bit types can hold (1e-8 is
# 0 in float16, 1e-5 a subnormal).
HALF_EPSILONS: dict[str, dict[str, float]] = {
    "rmsprop": {"epsilon": 1e-4},
    "adadelta": {"epsilon": 1e-4},
    "amsgrad": {"epsilon": 1e-3},
}
CUSTOM: dict[str, dict[str, float]] = {
    rule: {**hyper, **HALF_EPSILONS.get(rule, {})} for rule, hyper in EXACTNESS_CUSTOM.items()
}
DEFAULT: dict[str, dict[str, float]] = {rule: {} for rule in RULE_NAMES}
DEFAULT.update({"sgd": {"learning_rate": 0.05}, "momentum": {"learning_rate": 0.05}})
DEFAULT["nesterov_momentum"] = {"learning_rate": 0.05}


# --- an independent emulation of eager 16-bit torch on CPU -----------------------------------------


def round_to(values: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values rounded (to nearest, ties to even) to ``fmt``, returned as float32."""
    values = np.asarray(values, dtype=np.float32)
    if fmt == "float32":
        return values
    if fmt == "float16":
        return values.astype(np.float16).astype(np.float32)
    assert fmt == "bfloat16"
    bits = values.reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).reshape(values.shape)


class Eager16:
    """An array of ``fmt`` values (held as float32) whose arithmetic is eager torch's on CPU."""

    def __init__(self, values: Any, fmt: str) -> None:
        self.a = np.asarray(values, dtype=np.float32)
        self.fmt = fmt

    def _new(self, values: np.ndarray) -> Eager16:
        return Eager16(round_to(values, self.fmt), self.fmt)

    @staticmethod
    def _quiet() -> Any:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")

    def _operand(self, other: Any, rounds_scalar: bool) -> np.ndarray:
        if isinstance(other, Eager16):
            return other.a
        assert isinstance(other, (int, float)), type(other)
        scalar = np.float32(other)  # torch converts a Python number to float32 (the opmath type)
        return round_to(np.array(scalar), self.fmt) if rounds_scalar else np.array(scalar)

    def __add__(self, other: Any) -> Eager16:
        with self._quiet():
            return self._new(self.a + self._operand(other, True))

    __radd__ = __add__

    def __sub__(self, other: Any) -> Eager16:
        with self._quiet():
            return self._new(self.a - self._operand(other, True))

    def __mul__(self, other: Any) -> Eager16:
        with self._quiet():
            return self._new(self.a * self._operand(other, False))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Eager16:
        with self._quiet():
            return self._new(self.a / self._operand(other, False))

    def __pow__(self, power: int) -> Eager16:
        assert power == 2
        return self * self

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Eager16:
        assert method == "__call__" and not kwargs
        if ufunc is np.sqrt:
            # Correctly rounded: float32 root then once to 16 bits (2p + 2 <= 24: no double rounding).
            return self._new(np.sqrt(self.a))
        if ufunc is np.abs:
            return self._new(np.abs(self.a))
        if ufunc is np.maximum:
            a, b = inputs
            return self._new(np.maximum(a.a, b.a))
        raise NotImplementedError(ufunc)


def emulate(
    rule: str,
    hyper: dict[str, float],
    modifier: str | None,
    init: Sequence[torch.Tensor],
    grads: Sequence[Sequence[torch.Tensor]],
    state_dtype: torch.dtype | None,
) -> list[dict[str, np.ndarray]]:
    """Each parameter's final value (``"param"``) and state, as float32 arrays."""
    fmt = str(init[0].dtype).removeprefix("torch.")
    work = "float32" if state_dtype == torch.float32 else fmt
    spec = RULES[rule]
    rule_hyper = {k: v for k, v in spec.defaults.items() if v is not None}
    rule_hyper.update({k: v for k, v in hyper.items() if k != "momentum"})
    chain: list[tuple[Callable[..., Any], dict[str, float], tuple[str, ...]]] = []
    for name in (*spec.modifiers, *([modifier] if modifier else [])):
        mod = MODIFIERS[name]
        chain.append((mod.formula, {"momentum": hyper.get("momentum", 0.9)}, mod.state))
    results = []
    for i, p0 in enumerate(init):
        p = Eager16(p0.float().numpy(), work)
        state = {key: Eager16(np.zeros(p.a.shape), work) for key in spec.state}
        mod_state = [{key: Eager16(np.zeros(p.a.shape), work) for key in names} for _, _, names in chain]
        for t, step in enumerate(grads, start=1):
            g = Eager16(step[i].float().numpy(), work)
            u, state = spec.formula(p, g, state, t, **rule_hyper)
            for k, (formula, mod_hyper, _) in enumerate(chain):
                u, mod_state[k] = formula(p, u, mod_state[k], **mod_hyper)
            p = Eager16(round_to(u.a, fmt), work)  # written into the 16-bit parameter
        out = {"param": p.a, **{key: v.a for key, v in state.items()}}
        for s in mod_state:
            out.update({key: v.a for key, v in s.items()})
        results.append(out)
    return results


# --- the library ------------------------------------------------------------------------------


def problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    rng = np.random.default_rng(seed)
    init = [torch.tensor(rng.standard_normal(s)).to(dtype) for s in SHAPES]
    grads = [
        [
            torch.tensor(rng.standard_normal(s) * scale).to(dtype)
            for s, scale in zip(SHAPES, itertools.cycle(GRAD_SCALES))
        ]
        for _ in range(STEPS)
    ]
    return init, grads


def run(
    rule: str,
    hyper: dict[str, Any],
    modifier: str | None,
    engine: str,
    via_updates: bool,
    init: Sequence[torch.Tensor],
    grads: Sequence[Sequence[torch.Tensor]],
    state_dtype: torch.dtype | None,
) -> list[dict[str, torch.Tensor]]:
    params = [p.clone().requires_grad_(True) for p in init]
    # As emulate() reads it: "momentum" is the momentum rules' own and any modifier's.
    momentum = {key: value for key, value in hyper.items() if key == "momentum"}
    own = hyper if RULES[rule].modifiers else {key: value for key, value in hyper.items() if key not in momentum}
    opt = getattr(torchupdates, rule)(params, **own, engine=engine, state_dtype=state_dtype)
    if modifier:
        opt = getattr(torchupdates, modifier)(opt, None, **momentum)
    for g in grads:
        if via_updates:
            apply_updates(opt.updates([x.clone() for x in g]))
        else:
            opt.step([x.clone() for x in g])
    out = []
    for p in params:
        entry = {"param": p.detach()}
        entry.update({k: v for k, v in opt.state[p].items() if k != "step"})
        out.append(entry)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns: equal NaNs compare equal, and -0.0 differs from 0.0."""
    return tensor.view(torch.int16) if tensor.itemsize == 2 else tensor.view(torch.int32)


def assert_same_bits(got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert set(a) == set(b), f"{what}, param {i}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            x, y = a[key], b[key]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}, param {i} {key}"
            differ = int((bits(x) != bits(y)).sum())
            assert differ == 0, f"{what}, param {i} {key}: {differ} of {x.numel()} elements differ"


def as_torch(
    emulated: list[dict[str, np.ndarray]], like: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """The emulation's float32 arrays in the library's dtypes (exact: the values are representable)."""
    out = []
    for values, tensors in zip(emulated, like, strict=True):
        entry = {}
        for key, tensor in tensors.items():
            value = torch.from_numpy(np.asarray(values[key], dtype=np.float32)).reshape(tensor.shape)
            converted = value.to(tensor.dtype)
            exact = torch.allclose(converted.float(), value, rtol=0, atol=0, equal_nan=True)
            assert exact, f"{key}: the emulation left a value unrounded"
            entry[key] = converted
        out.append(entry)
    return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foreach_engine, "CPU_CHUNK_ELEMENTS", SMALL_CHUNK)


CASES = [(rule, None) for rule in RULE_NAMES] + [
    ("rmsprop", "apply_momentum"),
    ("adam", "apply_nesterov_momentum"),
    ("adadelta", "apply_nesterov_momentum"),
]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("state_dtype", [None, torch.float32], ids=["16-bit state", "float32 state"])
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
@pytest.mark.parametrize(("rule", "modifier"), CASES, ids=[f"{m}({r})" if m else r for r, m in CASES])
def test_engines_step_and_updates_match_the_emulation(
    rule: str, modifier: str | None, custom: bool, dtype: torch.dtype, state_dtype: torch.dtype | None
) -> None:
    hyper = (CUSTOM if custom else DEFAULT)[rule]
    init, grads = problem(dtype, seed=len(rule))
    runs = {
        (engine, via_updates): run(rule, hyper, modifier, engine, via_updates, init, grads, state_dtype)
        for engine in ("reference", "foreach")
        for via_updates in (False, True)
    }
    first = runs["reference", False]
    expected = as_torch(emulate(rule, hyper, modifier, init, grads, state_dtype), first)
    for (engine, via_updates), got in runs.items():
        assert_same_bits(got, expected, f"{engine} {'apply_updates(updates())' if via_updates else 'step()'}")


def test_foreach_update_dictionary_multiplies_as_eager_torch() -> None:
    # One element by hand: rmsprop's first step, accu = 0.9 * 0 + (1 - 0.9) * (g * g), float16.
    # g = float16(1.1) = 1.099609375; g * g = 1.20910... -> float16 1.208984375. Eager torch
    # multiplies by float32(0.1): 0.12089844 -> float16 0.12091064453125 (0x2FBD). The foreach
    # engine multiplied the intermediate g * g in place, and torch's _foreach_mul_ rounds 0.1 to
    # float16 first (0.0999755859375): 0.12086892 -> 0.120849609375 (0x2FBC), one ulp below.
    g = torch.tensor([1.1, -1.126, 3.0], dtype=torch.float16)
    g2 = np.float16(np.float32(np.float16(1.1)) * np.float32(np.float16(1.1)))
    assert float(g2) == 1.208984375
    hand = np.float16(np.float32(g2) * np.float32(1 - 0.9))
    assert hand.view(np.uint16) == 0x2FBD
    for engine in ("reference", "foreach"):
        param = torch.zeros(3, dtype=torch.float16, requires_grad=True)
        opt = torchupdates.rmsprop([param], engine=engine)
        updates = opt.updates([g])
        accu = updates[opt.state[param]["accu"]]
        assert int(accu[0:1].view(torch.int16)) == 0x2FBD, engine
        expected = (1 - 0.9) * (g * g)  # eager torch, operation by operation
        assert torch.equal(bits(accu), bits(expected)), engine


@needs_compiler
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("rule", ["rmsprop", "adadelta"])
def test_compiled_engine_matches_the_emulation(rule: str, dtype: torch.dtype) -> None:
    hyper = CUSTOM[rule]
    init, grads = problem(dtype, seed=3)
    first = run(rule, hyper, None, "compiled", False, init, grads, None)
    expected = as_torch(emulate(rule, hyper, None, init, grads, None), first)
    assert_same_bits(first, expected, "compiled step()")
    assert_same_bits(run(rule, hyper, None, "compiled", True, init, grads, None), expected, "compiled updates()")
    assert_same_bits(run(rule, hyper, None, "foreach", True, init, grads, None), expected, "foreach updates()")
