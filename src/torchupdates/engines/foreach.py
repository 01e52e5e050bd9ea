"""The foreach engine: parameters batched into tensor lists, one kernel per operation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .._tensorlist import Graph, TensorList
from ._chain import Batch, Slot, Stage, pairs_for_slot, run_chain, to_work

CPU_CHUNK_ELEMENTS = 1 << 18
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


def _storage(tensor: Tensor) -> int | None:
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard
    try:
        return int(local.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _may_write_in_place(members: Sequence[Slot]) -> bool:
    """Whether targets can be overwritten during the run: no gradient shares their memory."""
    targets = {_storage(t) for s in members for t in (s.param, *s.state.values())}
    grads = {_storage(s.grad) for s in members}
    return None not in targets and None not in grads and not targets & grads


def _leaf(graph: Graph, tensors: Sequence[Tensor], dtype: torch.dtype, writable: bool) -> TensorList:
    work = [to_work(t, dtype) for t in tensors]
    # Only a view of the target itself (not a cast copy) may receive results in place.
    aliases = all(
        w.dtype == (torch.view_as_real(t).dtype if t.is_complex() else t.dtype)
        for w, t in zip(work, tensors, strict=True)
    )
    return graph.leaf(work, writable=writable and aliases)


def propose_foreach(
    stages: Sequence[Stage],
    slots: Sequence[Slot],
    hyperparameters: Sequence[Sequence[dict[str, Any]]],
    write: bool = False,
) -> Iterator[Batch]:
    """Proposed new values for every slot's parameter and state, batch by batch.

    With ``write``, results may be written straight into the parameters and state; the
    pairs yielded are then only those still to be written.
    """
    batches: dict[Hashable, list[int]] = defaultdict(list)
    for index, slot in enumerate(slots):
        batches[_batch_key(slot)].append(index)
    for batch in batches.values():
        for indices in _chunks(batch, slots):
            members = [slots[i] for i in indices]
            first = members[0]
            dtype = first.work_dtype
            writable = write and _may_write_in_place(members)
            graph = Graph()
            param = _leaf(graph, [s.param for s in members], dtype, writable)
            state = {key: _leaf(graph, [s.state[key] for s in members], dtype, writable) for key in first.state}
            proposal, new_state = run_chain(
                stages,
                hyperparameters[first.group],
                param,
                _leaf(graph, [s.grad for s in members], dtype, writable=False),
                cast("dict[str, Any]", state),
                first.steps,
                first.applies,
            )
            keys = list(new_state)
            results = graph.run(
                [(cast(TensorList, proposal), param)] + [(cast(TensorList, new_state[k]), state[k]) for k in keys]
            )
            yield [
                (i, _pairs(stages, slot, k, results, keys))
                for k, (i, slot) in enumerate(zip(indices, members, strict=True))
            ]


def _pairs(
    stages: Sequence[Stage], slot: Slot, k: int, results: list[tuple[list[Tensor], bool]], keys: list[str]
) -> list[tuple[Tensor, Tensor]]:
    """The pairs of one slot that are still to be written (all of them when nothing was)."""
    (proposals, param_done), *state_results = results
    return pairs_for_slot(
        stages,
        slot,
        None if param_done else proposals[k],
        {key: tensors[k] for key, (tensors, in_place) in zip(keys, state_results, strict=True) if not in_place},
    )
