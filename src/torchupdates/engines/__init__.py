"""Engines: how a chain of formulas runs over the parameters of one step.

Every engine evaluates the same formulas (see :mod:`torchupdates.rules`); they differ only
in how tensors are batched. ``"reference"`` runs one parameter at a time with plain tensor
operations, the readable specification. ``"foreach"`` groups parameters that share device,
dtype, param group and step count, and runs each formula over a whole group per kernel (on
CPU and CUDA over the ``"compiled"`` engine's flat buffers). ``"compiled"`` fuses a group's formulas
into one kernel over flat buffers.

An engine is a generator: it yields one :data:`Batch` at a time so that a step can write a
batch while its tensors are still in cache, and :meth:`Optimizer.updates` can collect them.
In a step an engine may also write results in place as it goes (the foreach engine does, once
a target's old value has been read for the last time): the values are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._chain import Batch, Slot, Stage
from .compiled import CompiledEngine
from .foreach import ForeachEngine
from .reference import propose_reference

Engine = Callable[[Sequence[Stage], Sequence[Slot], Sequence[Sequence[dict[str, Any]]], bool], Iterator[Batch]]
"""``engine(stages, slots, hyperparameters, write)`` yields batches of proposed values.

``hyperparameters[group][stage]`` maps the stage's local hyperparameter names to values.
With ``write`` (a step, every input already checked) an engine may write results straight
into the parameters and state; it yields the (target, value) pairs still to be written.
"""

EngineFactory = Callable[[], Engine]
"""Makes the engine one optimizer uses. An engine that keeps buffers between steps (one per
optimizer) is an object with ``__call__``; a stateless engine's factory returns a function."""

ENGINES: dict[str, EngineFactory] = {
    "reference": lambda: propose_reference,
    "foreach": ForeachEngine,
    "compiled": CompiledEngine,
}

__all__ = ["ENGINES", "Batch", "Engine", "EngineFactory", "Slot", "Stage"]
