"""The foreach engine: parameters batched into tensor lists, one kernel per operation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any, cast

from torch import Tensor

from .._tensorlist import TensorList
from ._chain import Slot, Stage, pairs_for_slot, run_chain, to_work


def _batch_key(slot: Slot) -> Hashable:
    # A batch must share everything a formula reads as a scalar or a kernel requires alike.
    return (slot.group, slot.param.device, slot.work_dtype, slot.param.is_complex(), slot.steps, slot.applies)


def propose_foreach(
    stages: Sequence[Stage], slots: Sequence[Slot], hyperparameters: Sequence[Sequence[dict[str, Any]]]
) -> list[tuple[Tensor, Tensor]]:
    """Proposed new values for every slot's parameter and state, batch by batch.

    The pairs come back in slot order, as the reference engine gives them.
    """
    batches: dict[Hashable, list[int]] = defaultdict(list)
    for index, slot in enumerate(slots):
        batches[_batch_key(slot)].append(index)

    per_slot: list[list[tuple[Tensor, Tensor]]] = [[] for _ in slots]
    for indices in batches.values():
        members = [slots[i] for i in indices]
        first = members[0]
        dtype = first.work_dtype

        def stack(tensors: Sequence[Tensor], dtype: Any = dtype) -> TensorList:
            return TensorList([to_work(t, dtype) for t in tensors])

        proposal, new_state = run_chain(
            stages,
            hyperparameters[first.group],
            stack([s.param for s in members]),
            stack([s.grad for s in members]),
            {key: stack([s.state[key] for s in members]) for key in first.state},
            first.steps,
            first.applies,
        )
        proposals = cast(TensorList, proposal).tensors
        states = {key: cast(TensorList, value).tensors for key, value in new_state.items()}
        for position, (i, slot) in enumerate(zip(indices, members, strict=True)):
            slot_state = {key: values[position] for key, values in states.items()}
            per_slot[i] = pairs_for_slot(stages, slot, proposals[position], slot_state)
    return [pair for pairs in per_slot for pair in pairs]
