"""Chains with a per-tensor stage (:func:`~torchupdates.apply_norm_constraint`), run in segments.

The engines run chains of elementwise formulas. A norm constraint is not elementwise (each
output element depends on a whole slice of the proposal), so a chain that holds one is cut
there: the engine runs the elementwise stages before it on the gradients, as for
:meth:`~torchupdates.Optimizer.updates` (nothing written), the constraint rescales each
selected parameter's proposal as a whole tensor, and the engine runs the stages after it with
that proposal as their incoming value. The pieces are the same operations as editing the
update dictionary by hand: with the constraint last, a step equals
``upd = opt.updates(x); upd[p] = norm_constraint(upd[p], ...)`` and ``apply_updates(upd)``.
Proposals pass between segments in the parameter's dtype, as in the dictionary.

A step that writes, with the per-tensor stage last and alone, takes a shorter way to the same
bits: the engine writes the elementwise stages in place (fused, as a chain without the
constraint), and the constraint then rescales each written parameter where it lies (in place
when the stage gives its factor, ``Transform.scale``): the written parameter is the proposal,
and nothing after the constraint reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._groups import stage_values
from ._slots import make_slot
from .apply import write_updates
from .engines import Batch, Slot, Stage

__all__ = ["Propose", "constrain_written", "ends_per_tensor", "is_per_tensor", "run_in_segments"]

Propose = Callable[[Sequence[Stage], Sequence[Slot], Sequence[Sequence[dict[str, Any]]]], Iterator[Batch]]
"""An engine run without writing: ``propose(stages, slots, values)`` yields its batches."""


def is_per_tensor(stage: Stage) -> bool:
    """Whether the stage's formula works on whole tensors only (not elementwise)."""
    return stage.transform.per_tensor


def ends_per_tensor(stages: Sequence[Stage]) -> bool:
    """Whether the chain's one per-tensor stage is its last."""
    return is_per_tensor(stages[-1]) and not any(map(is_per_tensor, stages[:-1]))


def constrain_written(
    stage: Stage, params: Sequence[tuple[int, int, Tensor]], groups: Sequence[Mapping[str, Any]]
) -> None:
    """Apply the final per-tensor ``stage`` to parameters the step has written, in place.
    ``params`` holds ``(position, group index, parameter)`` of each parameter the step updated."""
    values = stage_values(groups, [stage])
    scale = stage.transform.scale
    for position, group, param in params:
        if not stage.applies_to(position):
            continue
        if scale is None:
            write_updates({param: _per_tensor(stage, param, param.detach(), values[group][0])})
        else:  # the same multiply, without a new tensor to allocate and copy back
            param.detach().mul_(scale(param.detach(), **values[group][0]))


def _per_tensor(stage: Stage, param: Tensor, proposal: Tensor, hyperparameters: dict[str, Any]) -> Tensor:
    """The per-tensor ``stage``'s new proposal for ``param`` (it keeps no state)."""
    new, _ = stage.transform.formula(param, proposal, {}, None, **hyperparameters)
    assert isinstance(new, Tensor)
    return new


def _segments(stages: Sequence[Stage]) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges: runs of elementwise stages, each per-tensor stage alone."""
    ranges: list[tuple[int, int]] = []
    start = 0
    for index, stage in enumerate(stages):
        if is_per_tensor(stage):
            if start < index:
                ranges.append((start, index))
            ranges.append((index, index + 1))
            start = index + 1
    if start < len(stages):
        ranges.append((start, len(stages)))
    return ranges


def run_in_segments(
    stages: Sequence[Stage],
    checked: Sequence[tuple[int, int, Tensor, Tensor]],
    states: Mapping[Tensor, Mapping[str, Any]],
    groups: Sequence[Mapping[str, Any]],
    state_dtype: torch.dtype | None,
    traced: bool,
    propose: Propose,
) -> Batch:
    """Every updated parameter's pairs (itself and its new state), as one batch.

    ``checked`` holds ``(position, group index, parameter, gradient)`` for each parameter the
    step updates, state already created; ``propose`` is the engine, run without writing.
    """
    incoming = [grad for *_, grad in checked]
    new_state: list[list[tuple[Tensor, Tensor]]] = [[] for _ in checked]
    for start, stop in _segments(stages):
        segment = stages[start:stop]
        values = stage_values(groups, segment)
        if is_per_tensor(segment[0]):
            stage = segment[0]
            for index, (position, group, param, _) in enumerate(checked):
                if stage.applies_to(position):
                    incoming[index] = _per_tensor(stage, param, incoming[index], values[group][0])
            continue
        slots = [
            make_slot(position, group, param, incoming[index], states[param], segment, state_dtype, traced)
            for index, (position, group, param, _) in enumerate(checked)
        ]
        for batch in propose(segment, slots, values):
            for index, pairs in batch:
                param = checked[index][2]
                for target, value in pairs:
                    if target is param:
                        incoming[index] = value
                    else:
                        new_state[index].append((target, value))
    return [(index, [(param, incoming[index]), *new_state[index]]) for index, (_, _, param, _) in enumerate(checked)]
