"""The reference engine: each parameter on its own, with plain tensor operations."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ..formula import Symbol, TensorGraph, Value
from ._chain import Batch, Slot, Stage, pairs_for_slot, run_chain, to_work


def propose_reference(
    stages: Sequence[Stage],
    slots: Sequence[Slot],
    hyperparameters: Sequence[Sequence[dict[str, Any]]],
    write: bool = False,
    traced: bool = False,
) -> Iterator[Batch]:
    """Proposed new values for every slot's parameter and state, one parameter at a time.

    The chain is recorded and its operations run one eager torch call each
    (:class:`~torchupdates.formula.TensorGraph`): the same operations, operands in the same
    order, as the other engines run. ``traced`` (a step traced by ``torch.compile``): the
    formulas run on the tensors themselves instead, since dynamo cannot trace a tensor
    coefficient times a symbol, and the compiler rounds the fused operations its own way
    anyway. Nothing is written here, with or without ``write``: every pair is yielded.
    """
    for index, slot in enumerate(slots):
        graph = None if traced else TensorGraph()
        state = {key: _leaf(graph, value, slot.work_dtype, key) for key, value in slot.state.items()}
        proposal, new_state = run_chain(
            stages,
            hyperparameters[slot.group],
            _leaf(graph, slot.param, slot.work_dtype, "param"),
            _leaf(graph, slot.grad, slot.work_dtype, "grad"),
            state,
            slot.steps,
            slot.applies,
        )
        if graph is not None:
            keys = list(new_state)
            proposal, *values = graph.run([cast(Symbol, proposal), *(cast(Symbol, new_state[key]) for key in keys)])
            new_state = dict(zip(keys, values, strict=True))
        yield [(index, pairs_for_slot(stages, slot, cast(Tensor, proposal), cast("dict[str, Tensor]", new_state)))]


def _leaf(graph: TensorGraph | None, tensor: Tensor, dtype: torch.dtype, name: str) -> Value:
    """``tensor`` in the working dtype, bound to a leaf of ``graph`` when there is one."""
    work = to_work(tensor, dtype)
    return work if graph is None else graph.leaf(work, name)
