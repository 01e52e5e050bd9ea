"""An independent float64 NumPy transcription of docs/design.md, section 3 ("The math").

Written from the formulas, not from ``src/``: the tests compare the library against this.
Every expression keeps the operation order of the formulas, so that a correct
implementation agrees with it to rounding (in practice: bit for bit, see test_exactness).

The model is the seed's: a *rule* maps a gradient to a proposed new parameter value ``u``;
a *modifier* maps a proposal ``u`` to a new proposal, with its own state, and may act on a
subset of the parameters only. :class:`ReferenceOptimizer` chains one rule and any number
of modifiers and writes the final proposal into the parameter.

Scalar coefficients (Adam's bias correction, ``1 - rho``) are computed with Python floats,
which are IEEE doubles, exactly as the formulas read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULTS", "MODIFIERS", "RULES", "STATE_NAMES", "ReferenceOptimizer"]

Array = np.ndarray
State = dict[str, Array]


# --- rules: (p, g, state, t, **hyper) -> (u, new_state) -------------------------------------


def sgd(p: Array, g: Array, s: State, t: int, *, learning_rate: float) -> tuple[Array, State]:
    return p - learning_rate * g, {}


def adagrad(p: Array, g: Array, s: State, t: int, *, learning_rate: float, epsilon: float) -> tuple[Array, State]:
    acc = s["accu"] + g**2
    return p - learning_rate * g / np.sqrt(acc + epsilon), {"accu": acc}


def rmsprop(
    p: Array, g: Array, s: State, t: int, *, learning_rate: float, rho: float, epsilon: float
) -> tuple[Array, State]:
    acc = rho * s["accu"] + (1 - rho) * g**2
    return p - learning_rate * g / np.sqrt(acc + epsilon), {"accu": acc}


def adadelta(
    p: Array, g: Array, s: State, t: int, *, learning_rate: float, rho: float, epsilon: float
) -> tuple[Array, State]:
    acc = rho * s["accu"] + (1 - rho) * g**2
    d = g * np.sqrt(s["delta_accu"] + epsilon) / np.sqrt(acc + epsilon)  # the old delta_accu
    dacc = rho * s["delta_accu"] + (1 - rho) * d**2
    return p - learning_rate * d, {"accu": acc, "delta_accu": dacc}


def _adam_moments(
    g: Array, s: State, t: int, learning_rate: float, beta1: float, beta2: float
) -> tuple[float, Array, Array]:
    """The step size (Adam's bias correction) and the new moments ``m``, ``v``: amsgrad differs from
    adam only in dividing by the running maximum of ``v``."""
    a = learning_rate * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    m = beta1 * s["m"] + (1 - beta1) * g
    v = beta2 * s["v"] + (1 - beta2) * g**2
    return a, m, v


def adam(
    p: Array, g: Array, s: State, t: int, *, learning_rate: float, beta1: float, beta2: float, epsilon: float
) -> tuple[Array, State]:
    a, m, v = _adam_moments(g, s, t, learning_rate, beta1, beta2)
    return p - a * m / (np.sqrt(v) + epsilon), {"m": m, "v": v}


def adamax(
    p: Array, g: Array, s: State, t: int, *, learning_rate: float, beta1: float, beta2: float, epsilon: float
) -> tuple[Array, State]:
    a = learning_rate / (1 - beta1**t)
    m = beta1 * s["m"] + (1 - beta1) * g
    u = np.maximum(beta2 * s["u"], np.abs(g))
    return p - a * m / (u + epsilon), {"m": m, "u": u}


def amsgrad(
    p: Array, g: Array, s: State, t: int, *, learning_rate: float, beta1: float, beta2: float, epsilon: float
) -> tuple[Array, State]:
    a, m, v = _adam_moments(g, s, t, learning_rate, beta1, beta2)
    v_hat = np.maximum(s["v_hat"], v)
    return p - a * m / (np.sqrt(v_hat) + epsilon), {"m": m, "v": v, "v_hat": v_hat}


# --- modifiers: (p, u, state, **hyper) -> (new u, new_state) --------------------------------


def apply_momentum(p: Array, u: Array, s: State, *, momentum: float) -> tuple[Array, State]:
    x = momentum * s["velocity"] + u
    return x, {"velocity": x - p}


def apply_nesterov_momentum(p: Array, u: Array, s: State, *, momentum: float) -> tuple[Array, State]:
    x = momentum * s["velocity"] + u - p
    return momentum * x + u, {"velocity": x}


@dataclass(frozen=True)
class Spec:
    """A rule or a modifier: its formula, defaults (None: required), state and step counting."""

    formula: Callable[..., tuple[Array, State]]
    defaults: dict[str, float | None]
    state: tuple[str, ...]
    counts_steps: bool = False
    modifiers: tuple[str, ...] = ()  # momentum / nesterov_momentum are sgd + a modifier


_ADAM_DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}

RULES: dict[str, Spec] = {
    "sgd": Spec(sgd, {"learning_rate": None}, ()),
    "momentum": Spec(sgd, {"learning_rate": None}, (), modifiers=("apply_momentum",)),
    "nesterov_momentum": Spec(sgd, {"learning_rate": None}, (), modifiers=("apply_nesterov_momentum",)),
    "adagrad": Spec(adagrad, {"learning_rate": 1.0, "epsilon": 1e-6}, ("accu",)),
    "rmsprop": Spec(rmsprop, {"learning_rate": 1.0, "rho": 0.9, "epsilon": 1e-6}, ("accu",)),
    "adadelta": Spec(adadelta, {"learning_rate": 1.0, "rho": 0.95, "epsilon": 1e-6}, ("accu", "delta_accu")),
    "adam": Spec(adam, {"learning_rate": 0.001, **_ADAM_DEFAULTS}, ("m", "v"), counts_steps=True),
    "adamax": Spec(adamax, {"learning_rate": 0.002, **_ADAM_DEFAULTS}, ("m", "u"), counts_steps=True),
    "amsgrad": Spec(amsgrad, {"learning_rate": 0.001, **_ADAM_DEFAULTS}, ("m", "v", "v_hat"), counts_steps=True),
}

MODIFIERS: dict[str, Spec] = {
    "apply_momentum": Spec(apply_momentum, {"momentum": 0.9}, ("velocity",)),
    "apply_nesterov_momentum": Spec(apply_nesterov_momentum, {"momentum": 0.9}, ("velocity",)),
}

DEFAULTS: dict[str, dict[str, float | None]] = {
    **{name: dict(spec.defaults) for name, spec in RULES.items()},
    **{name: dict(spec.defaults) for name, spec in MODIFIERS.items()},
}
# momentum(params, lr, momentum=0.9) takes the modifier's hyperparameter as its own.
DEFAULTS["momentum"]["momentum"] = 0.9
DEFAULTS["nesterov_momentum"]["momentum"] = 0.9

STATE_NAMES: dict[str, tuple[str, ...]] = {name: spec.state for name, spec in {**RULES, **MODIFIERS}.items()}


@dataclass
class _Stage:
    spec: Spec
    hyper: list[dict[str, float]]  # one dict per parameter
    members: frozenset[int] | None  # None: every parameter
    state: dict[int, State] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)

    def acts_on(self, index: int) -> bool:
        return self.members is None or index in self.members


def _merged(spec: Spec, given: dict[str, Any], name: str) -> dict[str, float]:
    unknown = set(given) - set(spec.defaults)
    if unknown:
        raise TypeError(f"{name}: unknown hyperparameters {sorted(unknown)}")
    merged = {key: given.get(key, default) for key, default in spec.defaults.items()}
    missing = [key for key, value in merged.items() if value is None]
    if missing:
        raise TypeError(f"{name}: missing {missing}")
    return {key: float(value) for key, value in merged.items()}  # type: ignore[arg-type]


class ReferenceOptimizer:
    """A chain ``rule -> modifier -> modifier ...`` over float64 NumPy arrays.

    Parameters
    ----------
    params : sequence of array-like
        Initial parameter values (copied to float64 arrays; 0-d allowed).
    rule : str
        A key of :data:`RULES`.
    hyper : dict or sequence of dict
        Hyperparameters of the rule: one dict for every parameter, or one dict per
        parameter (how param groups with their own hyperparameters are expressed).
        ``momentum``/``nesterov_momentum`` take ``momentum`` here too.
    """

    def __init__(
        self, params: Sequence[Any], rule: str, hyper: dict[str, Any] | Sequence[dict[str, Any]] | None = None
    ) -> None:
        self.params: list[Array] = [np.array(p, dtype=np.float64, copy=True) for p in params]
        n = len(self.params)
        per_param = [dict(hyper or {}) for _ in range(n)] if not isinstance(hyper, (list, tuple)) else list(hyper)
        if len(per_param) != n:
            raise ValueError("one hyperparameter dict per parameter")
        spec = RULES[rule]
        # momentum / nesterov_momentum pass their "momentum" on to their modifier stage.
        own = [{k: v for k, v in h.items() if k != "momentum" or not spec.modifiers} for h in per_param]
        self.stages: list[_Stage] = [_Stage(spec, [_merged(spec, h, rule) for h in own], None)]
        for modifier in spec.modifiers:  # momentum = sgd + apply_momentum, nesterov likewise
            mom = [{"momentum": h["momentum"]} if "momentum" in h else {} for h in per_param]
            self.add_modifier(modifier, None, mom)

    def add_modifier(
        self,
        name: str,
        params: Iterable[int] | None = None,
        hyper: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    ) -> ReferenceOptimizer:
        """Append a modifier acting on the parameters at positions ``params`` (None: all)."""
        spec = MODIFIERS[name]
        n = len(self.params)
        per_param = [dict(hyper or {}) for _ in range(n)] if not isinstance(hyper, (list, tuple)) else list(hyper)
        members = None if params is None else frozenset(params)
        self.stages.append(_Stage(spec, [_merged(spec, h, name) for h in per_param], members))
        return self

    def set_hyper(self, stage: int, name: str, value: float, params: Iterable[int] | None = None) -> None:
        """Change a hyperparameter of ``stages[stage]`` from the next step on."""
        indices = range(len(self.params)) if params is None else params
        for i in indices:
            if name not in self.stages[stage].hyper[i]:
                raise KeyError(name)
            self.stages[stage].hyper[i][name] = float(value)

    def step(self, grads: Sequence[Any]) -> None:
        """One step of every parameter; ``None`` in ``grads`` skips a parameter."""
        if len(grads) != len(self.params):
            raise ValueError("one gradient per parameter")
        new_params = []
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if g is None:
                new_params.append(p)
                continue
            g = np.array(g, dtype=np.float64)
            proposal = None
            for k, stage in enumerate(self.stages):
                if not stage.acts_on(i):
                    continue
                state = stage.state.setdefault(i, {name: np.zeros_like(p) for name in stage.spec.state})
                hyper = stage.hyper[i]
                if k == 0:
                    t = stage.steps.get(i, 0) + 1
                    proposal, new_state = stage.spec.formula(p, g, state, t, **hyper)
                    if stage.spec.counts_steps:
                        stage.steps[i] = t
                else:
                    proposal, new_state = stage.spec.formula(p, proposal, state, **hyper)
                stage.state[i] = {name: np.asarray(value, dtype=np.float64) for name, value in new_state.items()}
            new_params.append(np.asarray(proposal, dtype=np.float64))
        self.params = new_params

    def state_of(self, index: int) -> dict[str, Array]:
        """The state of parameter ``index``, keyed as a torchupdates optimizer keys it.

        The rule's names first; a modifier's ``velocity`` becomes ``velocity_2``,
        ``velocity_3``... when the name is taken by an earlier stage (as with
        ``apply_momentum(momentum(...))``). Step counters are under ``"step"``.
        """
        out: dict[str, Array] = {}
        taken: set[str] = set()
        for stage in self.stages:
            names = []
            for name in stage.spec.state:
                key, suffix = name, 2
                while key in taken:
                    key, suffix = f"{name}_{suffix}", suffix + 1
                taken.add(key)
                names.append((name, key))
            if stage.spec.counts_steps:
                taken.add("step")
            if index in stage.state:
                for name, key in names:
                    out[key] = stage.state[index][name]
            if stage.spec.counts_steps and index in stage.steps:
                out["step"] = np.asarray(stage.steps[index])
        return out
