"""The foreach engine's CPU step: a batch's formulas compiled once, run over cache-sized chunks.

On CPU, ``torch._foreach_*`` kernels are loops over tensors: a formula run over whole tensors
makes one pass over memory per operation, and each intermediate is a new tensor as large as
the parameters. Here a batch's chain is recorded once and compiled into a program of
single-tensor calls with ``out=`` (:mod:`._program`), which then runs chunk by chunk:

* a *direct* chunk is a range of one large tensor, in memory order, taken as 1-D views of
  the parameter, its gradient and its state (when all share dtype and layout): results are
  written straight into the parameter and state;
* a *staged* chunk packs small tensors (and blocks of large tensors that cannot be viewed
  alike) into staging buffers (one ``torch.cat`` or foreach copy per role), runs there, and
  copies the new parameters and state back with one foreach copy per role; a role whose
  pieces lie end to end in memory (a flat buffer's ranges) runs where it lies instead.

:func:`run_flat` steps a flat bucket (:mod:`._flat`) that holds the parameters and state:
large members in direct chunks of their ranges, small neighbours together on their ranges
as they lie, only their gradients packed. :func:`run_batch` steps any batch of plain tensors.

Either way a chunk's operands and temporaries (a few scratch buffers per thread, reused by
every chunk and every step) stay in cache, and nothing is allocated. A chunk holds at most
``foreach.CPU_CHUNK_ELEMENTS`` elements, fewer when the program's registers would span more
than :data:`CHUNK_BYTES`. Chunks run on the calling thread, each operation spread over torch's
threads, or, for programs taking NumPy's single-threaded square roots, one chunk per worker
thread (:mod:`._workers`). Every element goes through the same sequence of single IEEE
operations as in the reference engine, whichever way it runs.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any, cast

import torch
from torch import Tensor

from ..formula import Graph, Scalar, Symbol, needs_wide_sqrt, numpy_sqrt
from ._chain import (
    KeptRecordings,
    Slot,
    Stage,
    StepNumbers,
    counts_steps,
    number_tensor,
    recording_key,
    run_chain,
    step_scalars,
)
from ._flat import Span, dense_strides
from ._fusion import addcdiv_rounds_each_operation
from ._program import Program, compile_program
from ._workers import run_tasks

_PLAIN = (Tensor, torch.nn.Parameter)
_ALIGN = 16  # elements: chunk boundaries inside a tensor stay 64-byte aligned for float32


def _real(tensor: Tensor) -> Tensor:
    """The tensor as the formulas see it, without a cast: complex as real, 0-d as 1-element."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.unsqueeze(0) if tensor.dim() == 0 else tensor


def _flat(tensor: Tensor) -> Tensor:
    """A dense tensor's elements in memory order, as a 1-D view."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def _blocks(shape: Sequence[int], limit: int) -> Iterator[tuple[int | slice, ...]]:
    """Indices cutting a tensor of ``shape`` into rectangular blocks of at most ``limit``
    elements (whole rows along the first dimension while a row fits)."""
    inner = math.prod(shape[1:])
    if inner <= limit:
        rows = max(1, limit // max(inner, 1))
        for start in range(0, shape[0], rows):
            yield (slice(start, min(start + rows, shape[0])),)
        return
    for i in range(shape[0]):
        for rest in _blocks(shape[1:], limit):
            yield (i, *rest)


class _Buffers(threading.local):
    """Per thread: the scratch and staging buffers of each dtype, reused by every step."""

    def __init__(self) -> None:
        self.by_dtype: dict[torch.dtype, list[Tensor]] = {}
        self.views: dict[tuple[Any, ...], list[Tensor]] = {}

    def get(self, dtype: torch.dtype, count: int, size: int) -> list[Tensor]:
        held = self.by_dtype.get(dtype)
        if held is None or len(held) < count or held[0].numel() < size:
            if held:
                count, size = max(count, len(held)), max(size, held[0].numel())
            stride = -(-size // 64) * 64
            arena = torch.empty(count * stride, dtype=dtype)
            held = [arena[i * stride : i * stride + size] for i in range(count)]
            self.by_dtype[dtype] = held
            self.views = {key: views for key, views in self.views.items() if key[0] != dtype}
        return held

    def shaped(self, dtype: torch.dtype, register: int, buffer: Tensor, shapes: tuple[torch.Size, ...]) -> list[Tensor]:
        """Views of ``buffer`` laid end to end with the given shapes (cached per layout)."""
        key = (dtype, register, buffer.data_ptr(), shapes)
        views = self.views.get(key)
        if views is None:
            if len(self.views) > 4096:
                self.views.clear()
            sizes = [math.prod(shape) for shape in shapes]
            pieces = buffer[: sum(sizes)].split(sizes)
            views = [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)]
            self.views[key] = views
        return views


_BUFFERS = _Buffers()


@dataclass(frozen=True)
class _Job:
    """What every chunk of a batch shares: the program, its scalars, the register layout."""

    program: Program
    constants: tuple[Scalar, ...]
    dtype: torch.dtype
    leaves: int  # registers that are leaves (parameter, gradient, state)
    chunk: int  # elements per register buffer

    def registers(self, leaves: list[Tensor], length: int) -> list[Tensor]:
        """The leaf registers given, then this thread's scratch registers, ``length`` long."""
        count = self.leaves + self.program.scratch
        buffers = _BUFFERS.get(self.dtype, count, self.chunk)
        registers = leaves + [buffer[:length] for buffer in buffers[self.leaves : count]]
        if self.program.wide:
            registers.append(_BUFFERS.get(torch.float64, 1, self.chunk)[0][:length])
        return registers


def run_batch(
    stages: Sequence[Stage],
    members: Sequence[Slot],
    hyperparameters: Sequence[dict[str, Any]],
    chunk: int,
    threads: int = 1,
) -> bool:
    """Compute the batch's new parameters and state and write them in place (not counters).
    Chunks run on the calling thread, or on up to ``threads`` worker threads when the program
    takes NumPy's square roots (see :mod:`._workers`).

    Returns ``False``, having done nothing, unless every tensor is a plain CPU tensor.
    """
    first = members[0]
    dtype = first.work_dtype
    keys = list(first.state)
    rows = []
    for member in members:
        tensors = [member.param, member.grad, *[member.state[k] for k in keys]]
        for tensor in tensors:
            if type(tensor) not in _PLAIN or not tensor.is_cpu:
                return False
        rows.append(tensors)
    job = _job(stages, hyperparameters, first, keys, chunk)
    if job is None:
        return True
    chunk = job.chunk
    tasks: list[Callable[[], None]] = []
    staged: list[list[Tensor]] = []
    for tensors in rows:
        param = tensors[0]
        if param.is_complex() or param.dim() == 0:  # its gradient and state alike
            tensors = [_real(t) for t in tensors]
        numel = tensors[0].numel()
        if numel == 0:
            continue
        if numel * 4 >= chunk and _direct(tensors, dtype):
            tasks += _direct_tasks(job, tensors, numel)
        elif numel <= chunk:
            staged.append(tensors)
        else:
            staged += [[t[index] for t in tensors] for index in _blocks(tensors[0].shape, chunk)]
    tasks += _staged_tasks(job, staged)
    _run(job, tasks, threads)
    return True


def run_flat(
    stages: Sequence[Stage],
    hyperparameters: Sequence[dict[str, Any]],
    first: Slot,
    buffers: Mapping[str, Tensor],
    spans: Sequence[Span],
    grads: Sequence[Tensor],
    chunk: int,
    threads: int = 1,
) -> bool:
    """Step a flat bucket in place: ``buffers`` hold the members' parameters and state (one
    range per member, ``spans``), ``grads`` are the members' gradients, read where they are,
    both in the order of the ranges.
    A large member runs in chunks of its own ranges; small neighbours run together, on their
    ranges of the buffers as they lie, with their gradients packed into one register.
    ``first`` carries this step's numbers and which stages apply.

    Returns ``False``, having done nothing, unless every buffer has the working dtype (of
    ``first``, any member) and every gradient is a plain real CPU tensor of that dtype laid
    out as its member's range: :func:`run_batch` takes the rest. No gradient may lie in the
    buffers (a step copies such gradients first, or declines its steady state).
    """
    dtype = first.work_dtype
    keys = list(first.state)
    targets = [buffers["param"], *(buffers[key] for key in keys)]
    if any(buffer.dtype != dtype for buffer in targets) or not _laid_out_as(grads, spans, dtype):
        return False
    job = _job(stages, hyperparameters, first, keys, chunk)
    if job is None:
        return True
    tasks: list[Callable[[], None]] = []
    group: list[Tensor] = []
    start = size = 0
    for grad, span in zip(grads, spans, strict=True):
        numel = grad.numel()
        if numel * 4 >= job.chunk or size + numel > job.chunk:
            if group:
                tasks.append(functools.partial(_run_packed, job, [t[start : start + size] for t in targets], group))
            group, start, size = [], span.offset, 0
        if numel * 4 >= job.chunk:
            ranges = [t[span.offset : span.offset + numel] for t in targets]
            tasks += _direct_tasks(job, [ranges[0], grad, *ranges[1:]], numel)
            start = span.offset + numel
        elif numel:
            group.append(grad)
            size += numel
    if group:
        tasks.append(functools.partial(_run_packed, job, [t[start : start + size] for t in targets], group))
    _run(job, tasks, threads)
    return True


_DTYPE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")


def _laid_out_as(grads: Sequence[Tensor], spans: Sequence[Span], dtype: torch.dtype) -> bool:
    """Whether every gradient is a plain CPU tensor of ``dtype`` (so not complex: the buffers
    are real) strided as its member's range (an empty one: any strides); by C-level loops."""
    if not (
        all(map(_PLAIN.__contains__, map(type, grads)))
        and all(map(operator.is_, map(_DTYPE, grads), repeat(dtype)))
        and all(map(_IS_CPU, grads))
    ):
        return False
    strides = list(map(Tensor.stride, grads))
    expected = [span.strides for span in spans]
    return strides == expected or all(
        stride == span_strides or grad.numel() == 0
        for grad, stride, span_strides in zip(grads, strides, expected, strict=True)
    )


def _run(job: _Job, tasks: Sequence[Callable[[], None]], threads: int) -> None:
    # torch spreads each operation over the caller's threads itself (OpenMP, whose threads are
    # still spinning from the caller's last operations, e.g. a backward pass: waking workers
    # then leaves them a core short). NumPy's square root runs on one thread: programs using
    # it run their chunks on workers, one chunk per core.
    run_tasks(tasks, threads if job.program.numpy else 1)


def _job(
    stages: Sequence[Stage], hyperparameters: Sequence[dict[str, Any]], first: Slot, keys: list[str], chunk: int
) -> _Job | None:
    """What every chunk of the batch of ``first`` shares; ``None`` when its chain writes nothing.

    Recording the chain again is most of a small step's cost, and a chain whose
    hyperparameters are Python numbers records the same program at every step while they
    stay the same: that job is kept (:func:`_job_key`), with its constants, or with this
    step's read again when the chain counts steps (:func:`~._chain.step_scalars`).
    """
    key = _job_key(stages, hyperparameters, first, keys, chunk)
    kept = _JOBS.get(key, stages)
    if kept is not None:
        job, numbers = kept
        if not counts_steps(first.steps):
            return job
        scalars = step_scalars(stages, hyperparameters, first.steps, first.applies, keys)
        return replace(job, constants=_step_constants(scalars, job.dtype, numbers, job.program))
    dtype = first.work_dtype
    program = _compile(stages, hyperparameters, first, keys)
    if not program.outputs:
        return None
    leaves = 2 + len(keys)
    chunk = _chunk_elements(chunk, (leaves + program.scratch) * dtype.itemsize + 8 * program.wide)
    job = _Job(program, _constants(program.constants, dtype, program), dtype, leaves, chunk)
    _JOBS.put(key, stages, job)
    return job


def _job_key(
    stages: Sequence[Stage], hyperparameters: Sequence[dict[str, Any]], first: Slot, keys: list[str], chunk: int
) -> Hashable | None:
    """Everything a job is made from, when that is all (see :func:`~._chain.recording_key`)."""
    key = recording_key(stages, hyperparameters, first.steps, first.applies, first.work_dtype)
    dtype = first.work_dtype
    return None if key is None else (*key, tuple(keys), chunk, sqrt_mode(dtype), fuses(dtype))


_JOBS: KeptRecordings[_Job] = KeptRecordings(64)
"""Jobs of chains with number hyperparameters, by :func:`_job_key`."""


CHUNK_BYTES = 8 << 20
"""About how many bytes of registers (the chunk's parameter, gradient and state ranges, its
scratch and float64 buffers) a chunk may span: a program with many registers takes fewer
elements per chunk, so that the workers' chunks stay in the last-level cache together, while
light programs (SGD, momentum) take the largest chunks, which stream memory best."""


def _chunk_elements(largest: int, register_bytes: int) -> int:
    """Elements per chunk: ``largest``, or fewer when its registers would span more than
    :data:`CHUNK_BYTES` (then a multiple of 64 elements, so chunk boundaries stay aligned)."""
    fitting = CHUNK_BYTES // max(register_bytes, 1)
    return min(largest, max(64, fitting - fitting % 64))


def _constants(values: Sequence[Scalar], dtype: torch.dtype, program: Program) -> tuple[Scalar, ...]:
    """The program's arguments after its registers: its scalars, as 0-d tensors of the
    working dtype when that changes nothing, and the tensor 1 when it takes one.

    For float32 and float64 results, torch casts a scalar operand (a Python number or a 0-d
    tensor) to the result's dtype, rounding to nearest, before the elementwise loop: casting
    it once here gives the same operand and spares each call the conversion. float16 and
    bfloat16 kernels read some scalars in float32 instead, so their scalars stay as they are.
    """
    if dtype not in (torch.float32, torch.float64):
        return tuple(values)
    return _with_numbers(
        [
            value.to(dtype) if isinstance(value, Tensor) else number_tensor(position, float(value), dtype)
            for position, value in enumerate(values)
        ],
        dtype,
        program,
    )


def _step_constants(
    values: Sequence[Scalar], dtype: torch.dtype, numbers: StepNumbers, program: Program
) -> tuple[Scalar, ...]:
    """:func:`_constants` for a later step of a kept job: its numbers written into the job's
    :class:`~._chain.StepNumbers` (the job runs before the next step asks for them)."""
    held = numbers.hold(values, dtype) if dtype in (torch.float32, torch.float64) else None
    return _constants(values, dtype, program) if held is None else _with_numbers(list(held), dtype, program)


def _with_numbers(tensors: list[Tensor], dtype: torch.dtype, program: Program) -> tuple[Scalar, ...]:
    """The 0-d tensors, those ``program`` takes as numbers read out (the same rounded
    value), and its 0-d one last when it takes one."""
    constants: list[Scalar] = list(tensors)
    for position in program.numbers:
        constants[position] = tensors[position].item()
    if program.one:
        constants.append(number_tensor(-1, 1.0, dtype))
    return tuple(constants)


def fuses(dtype: torch.dtype) -> bool:
    """Whether CPU programs of this working dtype let one ``addcdiv`` call stand for two or
    three operations (:mod:`._fusion`): for float32 and float64, where this torch's kernel
    rounds each of them, and not under a Python dispatch or function mode, which should see
    the recorded operations."""
    if dtype not in (torch.float32, torch.float64):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    return addcdiv_rounds_each_operation(dtype)


def _compile(
    stages: Sequence[Stage], hyperparameters: Sequence[dict[str, Any]], first: Slot, keys: list[str]
) -> Program:
    graph = Graph()
    param, grad = graph.leaf("param"), graph.leaf("grad")
    state = {key: graph.leaf(key) for key in keys}
    proposal, new_state = run_chain(
        stages, hyperparameters, param, grad, cast("dict[str, Any]", state), first.steps, first.applies
    )
    roles = ["param", "grad", *keys]
    position = {role: i for i, role in enumerate(roles)}
    outputs = [(cast(Symbol, proposal), 0)]
    outputs += [(cast(Symbol, value), position[key]) for key, value in new_state.items()]
    writable = [role != "grad" for role in roles]
    dtype = first.work_dtype
    return compile_program(
        graph, [param, grad, *state.values()], writable, outputs, sqrt_mode(dtype), fuse=fuses(dtype)
    )


def sqrt_mode(dtype: torch.dtype) -> str:
    """How a CPU program of this working dtype takes correctly rounded square roots (torch's
    own operations under a Python dispatch or function mode, which should see them all)."""
    if not needs_wide_sqrt(dtype, torch.device("cpu")):
        return "native"
    modes = torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
    return "numpy" if dtype == torch.float32 and not modes and numpy_sqrt() is not None else "wide"


def _direct(tensors: Sequence[Tensor], dtype: torch.dtype) -> bool:
    """Whether the slot's tensors can be taken as aligned 1-D views: same dtype (the working
    one), shape and strides, and dense."""
    first = tensors[0]
    shape, strides = first.shape, first.stride()
    return dense_strides(first) is not None and all(
        t.dtype == dtype and t.shape == shape and t.stride() == strides for t in tensors
    )


def _direct_tasks(job: _Job, tensors: list[Tensor], numel: int) -> list[Callable[[], None]]:
    """One task per chunk of a tensor whose roles are viewed in place, in near-equal pieces."""
    flats = [_flat(t) for t in tensors]
    pieces = -(-numel // job.chunk)
    size = -(-numel // pieces)
    if size % _ALIGN and size + _ALIGN - size % _ALIGN <= job.chunk:
        size += _ALIGN - size % _ALIGN
    return [
        functools.partial(_run_direct, job, flats, start, min(size, numel - start)) for start in range(0, numel, size)
    ]


def _run_direct(job: _Job, flats: list[Tensor], start: int, length: int) -> None:
    registers = job.registers([flat[start : start + length] for flat in flats], length)
    job.program.run(*registers, *job.constants)


def _staged_tasks(job: _Job, pieces: list[list[Tensor]]) -> list[Callable[[], None]]:
    """Tasks running groups of pieces (whole small tensors, or blocks) of at most a chunk."""
    tasks: list[Callable[[], None]] = []
    group: list[list[Tensor]] = []
    size = 0
    for tensors in pieces:
        numel = tensors[0].numel()
        if size + numel > job.chunk and group:
            tasks.append(functools.partial(_run_group, job, group, size))
            group, size = [], 0
        group.append(tensors)
        size += numel
    if group:
        tasks.append(functools.partial(_run_group, job, group, size))
    return tasks


def _run_group(job: _Job, group: list[list[Tensor]], size: int) -> None:
    """Run the group's pieces: each role's pieces in place where they lie end to end in
    memory (a flat buffer's ranges), else copied into this thread's staging register first
    (and the results copied back)."""
    staging = _BUFFERS.get(job.dtype, job.leaves + job.program.scratch, job.chunk)[: job.leaves]
    shapes = tuple(tensors[0].shape for tensors in group)
    flat = len(shapes[0]) == 1 and all(len(shape) == 1 for shape in shapes)
    leaves: list[Tensor] = []
    staged: list[int] = []
    for role in range(job.leaves):
        pieces = [tensors[role] for tensors in group]
        joined = _end_to_end(pieces, job.dtype, size)
        if joined is not None:
            leaves.append(joined)
            continue
        leaves.append(staging[role][:size])
        staged.append(role)
        if role not in job.program.reads:
            continue
        if flat and all(t.dtype == job.dtype for t in pieces):
            torch.cat(pieces, out=leaves[role])  # one copy kernel for 1-D pieces
        else:
            _copy(pieces, _BUFFERS.shaped(job.dtype, role, staging[role], shapes))
    job.program.run(*job.registers(leaves, size), *job.constants)
    for role in job.program.outputs:
        if role in staged:
            views = _BUFFERS.shaped(job.dtype, role, staging[role], shapes)
            _copy(views, [tensors[role] for tensors in group])


def _run_packed(job: _Job, targets: list[Tensor], grads: list[Tensor]) -> None:
    """Run neighbouring members: ``targets`` are their parameters' and state's ranges of the
    buffers, their gradients are packed into this thread's gradient register first."""
    size = targets[0].numel()
    register = _BUFFERS.get(job.dtype, job.leaves + job.program.scratch, job.chunk)[1]
    packed = register[:size]
    if 1 in job.program.reads:
        # One copy kernel for 1-D pieces; else one call copying each gradient into its place
        # (viewed with its shape: contiguous, its memory order), or pieces in memory order.
        if all(grad.dim() == 1 for grad in grads):
            torch.cat(grads, out=packed)
        elif all(grad.is_contiguous() for grad in grads):
            _copy(grads, _BUFFERS.shaped(job.dtype, 1, register, tuple(grad.shape for grad in grads)))
        else:
            torch.cat([_flat(grad) for grad in grads], out=packed)
    job.program.run(*job.registers([targets[0], packed, *targets[1:]], size), *job.constants)


def _end_to_end(pieces: Sequence[Tensor], dtype: torch.dtype, size: int) -> Tensor | None:
    """One 1-D tensor over the pieces' memory when they are contiguous tensors of ``dtype``
    lying end to end in one storage, in order (``size`` elements in all); else ``None``."""
    first = pieces[0]
    if len(pieces) == 1 or first.dtype != dtype or not first.is_contiguous():
        return None
    width = first.element_size()
    end = first.data_ptr()
    for piece in pieces:
        if piece.data_ptr() != end or piece.dtype != dtype or not piece.is_contiguous():
            return None
        end += piece.numel() * width
    if pieces[-1].untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
        return None
    return first.as_strided((size,), (1,), first.storage_offset())


def _copy(sources: list[Tensor], targets: list[Tensor]) -> None:
    if len(targets) == 1:
        targets[0].copy_(sources[0])
    else:
        torch._foreach_copy_(targets, sources)
