"""The foreach engine: parameters batched, each operation one kernel over many tensors.

A step of plain CPU or CUDA tensors keeps a batch's parameters and state in the compiled
engine's flat buffers (:class:`ForeachEngine`). On CPU it runs the batch through :mod:`._cpu`:
the formulas recorded once and compiled into single-tensor calls with ``out=`` over
preallocated registers, run over cache-sized chunks of the buffers (on worker threads where
that pays, :mod:`._workers`), with the gradients read where they are. On CUDA the gradients
are kept in the buffers too, and the recorded tensor lists below run over one tensor per
role. Everything else (other devices, whose multi-tensor kernels want whole lists; update
dictionaries, whose values must be new tensors; tensor subclasses such as DTensor) records
and runs tensor lists of the tensors themselves, in chunks through :mod:`._cpu` on CPU
(gradients that share memory with a parameter or its state copied first).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from ..formula import ELEMENTWISE, ForeachGraph, Node, Scalar, ScalarKind, Symbol, probe_operands, scalar_kind
from . import _cpu
from ._chain import Batch, Slot, Stage, pairs_for_slot, run_chain, to_work
from ._flat import FlatBucket, storage_address
from .compiled import CompiledEngine

_PLAIN = (Tensor, torch.nn.Parameter)

CPU_CHUNK_ELEMENTS = 1 << 19
"""On CPU a batch is cut into chunks of at most this many elements (fewer for formulas with many
operands and temporaries, see ``_cpu.CHUNK_BYTES``): foreach ops are loops over tensors there,
so small chunks keep a formula's temporaries in cache. On accelerators a batch stays whole,
for the multi-tensor kernels."""

CPU_MAX_WORKERS = 8
"""At most this many worker threads run a CPU step's chunks, where workers are used (one per
torch thread of the caller, up to this cap): beyond it the Python between operations, which
holds the GIL, would keep workers waiting, and memory bandwidth is spent anyway."""


FLAT_CHUNK_ELEMENTS = 1 << 24
"""On CUDA the flat buffers run in ranges of at most this many elements: a step's intermediate
values are temporaries as large as a range (a few of them at once), so the memory a step
borrows stays bounded however large the model, while each launch still covers millions of
elements."""


def cpu_workers() -> int:
    """How many worker threads a CPU step uses: the caller's torch threads, capped."""
    return max(1, min(torch.get_num_threads(), CPU_MAX_WORKERS))


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


def _may_write_in_place(members: Sequence[Slot]) -> bool:
    """Whether targets can be overwritten during the run: no gradient shares their memory."""
    targets = {storage_address(t) for s in members for t in (s.param, *s.state.values())}
    grads = {storage_address(s.grad) for s in members}
    return None not in targets and None not in grads and not targets & grads


_IN_PLACE: dict[str, Callable[..., None]] = {
    "add": torch._foreach_add_,
    "sub": torch._foreach_sub_,
    "mul": torch._foreach_mul_,
    "div": torch._foreach_div_,
}
_OUT_OF_PLACE: dict[str, Callable[..., Sequence[Tensor]]] = {
    "add": torch._foreach_add,
    "sub": torch._foreach_sub,
    "mul": torch._foreach_mul,
    "div": torch._foreach_div,
}
_HALF = (torch.float16, torch.bfloat16)


class _EagerGraph(ForeachGraph):
    """A :class:`~torchupdates.formula.ForeachGraph` whose 16-bit scalar operations round as eager torch's do.

    Eager ``torch.mul(x, 0.9)`` on a float16 or bfloat16 tensor computes ``x * 0.9`` in float32
    and rounds once; torch's in-place ``_foreach_mul_`` on CPU (torch 2.13) first rounds the
    Python number to the tensor's dtype, so that ``_foreach_mul_([x], 0.1)`` and ``x * 0.1``
    differ in about a third of the elements (float16 ``-1.126 * 0.1``: ``-0.1126`` eagerly,
    ``-0.11255`` in place, computed from ``float16(0.1)``). Which foreach variant rounds like
    the eager operation is found by trying it once per (operation, dtype, device, scalar kind),
    see :func:`_foreach_variant`; a 16-bit operation with a scalar operand runs in place only
    where that is exact, out of place with a foreach kernel if that is, else tensor by tensor.
    """

    def compute(self, node: Node, operands: list[list[Tensor] | Scalar]) -> list[Tensor] | None:
        first, scalar = operands[0], operands[-1]
        if (
            node.op in _IN_PLACE
            and isinstance(first, list)
            and first
            and first[0].dtype in _HALF
            and not isinstance(scalar, list)
            and not torch.compiler.is_compiling()
        ):
            variant = _foreach_variant(node.op, first[0].dtype, first[0].device, scalar_kind(scalar))
            if variant == "out of place":
                return list(_OUT_OF_PLACE[node.op](first, scalar))
            if variant == "eager":
                return [ELEMENTWISE[node.op](t, scalar) for t in first]
        return None


@functools.cache
def _foreach_variant(op: str, dtype: torch.dtype, device: torch.device, kind: ScalarKind) -> str:
    """The first foreach variant of ``op(tensor, scalar)`` that rounds every element as the
    eager single-tensor operation does: ``"in place"``, ``"out of place"`` or ``"eager"``
    (neither: one eager call per tensor). Found by trying them once per process."""
    tensor, scalar = probe_operands(dtype, device, kind)
    expected = ELEMENTWISE[op](tensor, scalar)
    in_place = tensor.clone()
    try:
        _IN_PLACE[op]([in_place], scalar)
        if torch.equal(in_place, expected):
            return "in place"
        if torch.equal(_OUT_OF_PLACE[op]([tensor], scalar)[0], expected):
            return "out of place"
    except (RuntimeError, TypeError):  # no such overload: the graph would not have recorded it
        pass
    return "eager"


def _leaf(graph: ForeachGraph, tensors: Sequence[Tensor], dtype: torch.dtype, writable: bool) -> Symbol:
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
    # Chunks write as they go: no gradient is the memory of a target of the step (a step
    # copies such gradients first, see _slots.unaliased).
    fast = write and not torch.compiler.is_compiling()
    threads = cpu_workers()
    for batch in batches.values():
        members = [slots[i] for i in batch]
        if fast and _cpu.run_batch(stages, members, hyperparameters[members[0].group], CPU_CHUNK_ELEMENTS, threads):
            _write_counters(stages, members)
            yield [(i, []) for i in batch]
            continue
        for indices in _chunks(batch, slots):
            members = [slots[i] for i in indices]
            first = members[0]
            dtype = first.work_dtype
            writable = write and _may_write_in_place(members)
            graph = _EagerGraph()
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
                [(cast(Symbol, proposal), param)] + [(cast(Symbol, new_state[k]), state[k]) for k in keys]
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


def _write_counters(stages: Sequence[Stage], members: Sequence[Slot]) -> None:
    """Set every member's step counters to this step's numbers (members share them)."""
    for stage, t in zip(stages, members[0].steps, strict=True):
        if stage.step_key is None or t is None:
            continue
        counters = [slot.counters[stage.step_key] for slot in members]
        if all(type(c) in _PLAIN and c.is_cpu for c in counters):
            torch._foreach_copy_(counters, [torch.tensor(t, dtype=torch.int64)] * len(counters))
        else:
            for counter in counters:
                counter.copy_(torch.full_like(counter, t))


class ForeachEngine(CompiledEngine):
    """``engine="foreach"``: :func:`propose_foreach`, except for steps of plain tensors on
    the CPU or a CUDA device, which keep them in the compiled engine's flat buffers (and take
    its steady state, which skips the per-parameter work while nothing was replaced).

    On a CUDA device the gradients are kept there too, and the foreach lists run over the
    buffers, one tensor per role: one launch per operation serves every tensor of a batch,
    where lists of the tensors themselves cost Python and launches per parameter. On the CPU
    the buffers hold the parameters and state only: the chunked program (:mod:`._cpu`) reads
    each gradient where it is, and runs the parameters and state of small tensors, which lie
    side by side in the buffers, without packing them first."""

    def __call__(
        self,
        stages: Sequence[Stage],
        slots: Sequence[Slot],
        hyperparameters: Sequence[Sequence[dict[str, Any]]],
        write: bool = False,
    ) -> Iterator[Batch]:
        if write and any(self.flattens(slot.param.device) for slot in slots):
            return super().__call__(stages, slots, hyperparameters, write)
        self.forget()
        return propose_foreach(stages, slots, hyperparameters, write)

    @staticmethod
    def flattens(device: torch.device) -> bool:
        """Whether steps on ``device`` run in flat buffers: on the CPU and a CUDA device."""
        return device.type in ("cpu", "cuda")

    def grads_in_bucket(self, device: torch.device) -> bool:
        return device.type != "cpu"

    def gradients_in_place_from(self, device: torch.device) -> int | None:
        return None  # on the CPU no gradient is copied; on CUDA a new one always is

    def takes(self, members: Sequence[Slot]) -> bool:
        return (
            self.flattens(members[0].param.device)
            and super().takes(members)
            and all(type(t) in _PLAIN for slot in members for t in (slot.param, slot.grad, *slot.state.values()))
        )

    def elsewhere(
        self,
        stages: Sequence[Stage],
        members: Sequence[Slot],
        hyperparameters: Sequence[Sequence[dict[str, Any]]],
        write: bool,
    ) -> Iterator[Batch]:
        return propose_foreach(stages, members, hyperparameters, write)

    def run_kernel(
        self,
        stages: Sequence[Stage],
        hyperparameters: Sequence[dict[str, Any]],
        first: Slot,
        steps: tuple[Any, ...],
        bucket: FlatBucket,
        grads: Sequence[Tensor] | None = None,
    ) -> None:
        # On the CPU (``grads`` given: the bucket keeps none) the chunked program runs over the
        # buffers where it can; the member slots below take the rest (another layout or dtype).
        if grads is not None and not torch.compiler.is_compiling():
            this_step = first if first.steps == steps else dataclasses.replace(first, steps=steps)
            chunk, workers = CPU_CHUNK_ELEMENTS, cpu_workers()
            spans, ordered = bucket.in_memory_order(bucket.spans), bucket.in_memory_order(grads)
            if _cpu.run_flat(stages, hyperparameters, this_step, bucket.buffers, spans, ordered, chunk, workers):
                return
        # The bucket keeps the step counters: these only receive what the run would write.
        counters = {
            stage.step_key: torch.zeros((), dtype=torch.int64)
            for stage, t in zip(stages, steps, strict=True)
            if stage.step_key is not None and t is not None
        }
        applies, dtype = first.applies, first.work_dtype
        runs: list[list[Slot]] = []
        if grads is None:  # one slot per range of the buffers
            for start in range(0, bucket.buffers["param"].numel(), FLAT_CHUNK_ELEMENTS):
                buffers = {role: buffer[start : start + FLAT_CHUNK_ELEMENTS] for role, buffer in bucket.buffers.items()}
                state = {key: buffers[key] for key in first.state}
                runs.append([Slot(buffers["param"], buffers["grad"], state, counters, 0, steps, applies, dtype)])
        else:  # one slot per member: its ranges of the buffers, and its gradient
            held = [bucket.views(key) for key in first.state]
            keys = list(first.state)
            runs.append(
                [
                    Slot(param, grad, dict(zip(keys, views, strict=True)), counters, 0, steps, applies, dtype)
                    for param, grad, *views in zip(bucket.views("param"), grads, *held, strict=True)
                ]
            )
        for slots in runs:
            for batch in propose_foreach(stages, slots, [hyperparameters], write=True):
                for _, pairs in batch:
                    for target, value in pairs:
                        target.copy_(value)
