"""The reference engine: each parameter on its own, with plain tensor operations."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from torch import Tensor

from ._chain import Batch, Slot, Stage, pairs_for_slot, run_chain, to_work


def propose_reference(
    stages: Sequence[Stage],
    slots: Sequence[Slot],
    hyperparameters: Sequence[Sequence[dict[str, Any]]],
    write: bool = False,
) -> Iterator[Batch]:
    """Proposed new values for every slot's parameter and state, one parameter at a time.

    Nothing is written here, with or without ``write``: every pair is yielded.
    """
    for index, slot in enumerate(slots):
        proposal, new_state = run_chain(
            stages,
            hyperparameters[slot.group],
            to_work(slot.param, slot.work_dtype),
            to_work(slot.grad, slot.work_dtype),
            {key: to_work(value, slot.work_dtype) for key, value in slot.state.items()},
            slot.steps,
            slot.applies,
        )
        yield [(index, pairs_for_slot(stages, slot, cast(Tensor, proposal), cast("dict[str, Tensor]", new_state)))]
