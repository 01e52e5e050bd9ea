"""float32 runs agree bit for bit with a float32 NumPy transcription of the formulas.

NumPy's float32 arithmetic is IEEE single precision, correctly rounded operation by operation
(square roots included), with Python-float coefficients rounded once to float32 where they
meet an array, as torch does. So a correct float32 implementation of the formulas, written
in the same operation order, must match it exactly, step after step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import numpy_reference as ref
import torchupdates
from torchupdates.registry import RULE_NAMES as RULES

SHAPES = [(5,), (3, 4), (2, 3, 2, 2)]
HYPER: dict[str, dict[str, float]] = {
    "sgd": {"learning_rate": 0.05},
    "momentum": {"learning_rate": 0.05},
    "nesterov_momentum": {"learning_rate": 0.05},
    "adagrad": {"learning_rate": 0.1},
    "rmsprop": {"learning_rate": 0.01},
}


def numpy_run(rule: str, init: list[np.ndarray], grads: list[list[np.ndarray]], hyper: dict[str, Any]) -> list[Any]:
    spec = ref.RULES[rule]
    values = {k: v for k, v in {**ref.DEFAULTS[rule], **hyper}.items() if k != "momentum"}
    params = [p.copy() for p in init]
    states = [{name: np.zeros_like(p) for name in spec.state} for p in params]
    velocities = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            proposal, states[i] = spec.formula(params[i], g, states[i], t, **values)
            for modifier in spec.modifiers:
                proposal, new = ref.MODIFIERS[modifier].formula(
                    params[i], proposal, {"velocity": velocities[i]}, momentum=0.9
                )
                velocities[i] = new["velocity"]
            params[i] = proposal
    return params


@pytest.mark.parametrize("engine", ["reference", "foreach"])
@pytest.mark.parametrize("rule", RULES)
def test_float32_is_bitwise_the_float32_formula(rule: str, engine: str) -> None:
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    grads = [[(rng.standard_normal(shape) * 0.1).astype(np.float32) for shape in SHAPES] for _ in range(30)]
    expected = numpy_run(rule, init, grads, HYPER.get(rule, {}))

    params = [torch.tensor(p, requires_grad=True) for p in init]
    optimizer = getattr(torchupdates, rule)(params, engine=engine, **HYPER.get(rule, {}))
    for step_grads in grads:
        optimizer.step([torch.from_numpy(g) for g in step_grads])
    for param, want in zip(params, expected, strict=True):
        assert param.dtype == torch.float32
        assert want.dtype == np.float32
        assert torch.equal(param.detach(), torch.from_numpy(want)), int((param.detach().numpy() != want).sum())
