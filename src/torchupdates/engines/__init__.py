"""Engines: how a chain of formulas runs over the parameters of one step.

Every engine evaluates the same formulas (see :mod:`torchupdates.rules`); they differ only
in how tensors are batched. ``"reference"`` runs one parameter at a time with plain tensor
operations, the readable specification. ``"foreach"`` groups parameters that share device,
dtype, param group and step count, and runs each formula over a whole group per kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from ._chain import Slot, Stage
from .foreach import propose_foreach
from .reference import propose_reference

Engine = Callable[[Sequence[Stage], Sequence[Slot], Sequence[Sequence[dict]]], "list[tuple[Tensor, Tensor]]"]
"""``engine(stages, slots, hyperparameters) -> [(target, new value), ...]``.

``hyperparameters[group][stage]`` maps the stage's local hyperparameter names to values.
"""

ENGINES: dict[str, Engine] = {
    "reference": propose_reference,
    "foreach": propose_foreach,
}

__all__ = ["ENGINES", "Engine", "Slot", "Stage"]
