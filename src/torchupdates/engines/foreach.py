"""The foreach engine: parameters batched into tensor lists, one kernel per operation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .._tensorlist import TensorList
from ._chain import Batch, Slot, Stage, pairs_for_slot, run_chain, to_work

CPU_CHUNK_ELEMENTS = 1 << 16
"""On CPU a batch is cut into chunks of about this many elements: foreach ops are loops over
tensors there, so small chunks keep a formula's temporaries in cache. On accelerators a batch
stays whole, for the multi-tensor kernels."""


def _batch_key(slot: Slot) -> Hashable:
    # A batch must share everything a formula reads as a scalar or a kernel requires alike.
    return (slot.group, slot.param.device, slot.work_dtype, slot.param.is_complex(), slot.steps, slot.applies)


def _chunks(indices: list[int], slots: Sequence[Slot]) -> Iterator[list[int]]:
    if slots[indices[0]].param.device.type != "cpu":
        yield indices
        return
    chunk: list[int] = []
    size = 0
    for index in indices:
        chunk.append(index)
        size += slots[index].param.numel()
        if size >= CPU_CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _stack(tensors: Sequence[Tensor], dtype: torch.dtype) -> TensorList:
    return TensorList([to_work(t, dtype) for t in tensors])


def propose_foreach(
    stages: Sequence[Stage], slots: Sequence[Slot], hyperparameters: Sequence[Sequence[dict[str, Any]]]
) -> Iterator[Batch]:
    """Proposed new values for every slot's parameter and state, batch by batch."""
    batches: dict[Hashable, list[int]] = defaultdict(list)
    for index, slot in enumerate(slots):
        batches[_batch_key(slot)].append(index)
    for batch in batches.values():
        for indices in _chunks(batch, slots):
            members = [slots[i] for i in indices]
            first = members[0]
            dtype = first.work_dtype
            proposal, new_state = run_chain(
                stages,
                hyperparameters[first.group],
                _stack([s.param for s in members], dtype),
                _stack([s.grad for s in members], dtype),
                {key: _stack([s.state[key] for s in members], dtype) for key in first.state},
                first.steps,
                first.applies,
            )
            proposals = cast(TensorList, proposal).tensors
            states = {key: cast(TensorList, value).tensors for key, value in new_state.items()}
            yield [
                (i, pairs_for_slot(stages, slot, proposals[k], {key: values[k] for key, values in states.items()}))
                for k, (i, slot) in enumerate(zip(indices, members, strict=True))
            ]
