"""The joint sum of squares of many CPU tensors in a few calls, bit for bit as one
``torch.sum(t * t)`` per tensor added in order.

:func:`~torchupdates.constraints.joint_norm` (``max_grad_norm``, ``total_norm_constraint``)
defines its sum that way: each tensor's squares summed by torch, the sums added in order.
Over many small tensors that is three eager calls per tensor (a square, a sum, an addition
of 0-d tensors), about 5 µs each: 0.9 ms for the benchmark's 188 gradients of 4,096 elements,
whose memory takes 0.06 ms to read. Two facts give the same bits in fewer calls:

- torch sums a CPU tensor shorter than its grain size (32,768 elements) on one thread, by
  the loop that also sums each row of a 2-D tensor; so short tensors of one shape are
  stacked and summed by rows (checked for every length up to 32,768, float32 and float64);
- the float64 sum of two float32 numbers, rounded to float32, is their float32 sum (float64
  has more than twice float32's precision), so the per-tensor sums are added on the host,
  each partial sum rounded to the dtype (through an ``array``), 0.1 µs an addition.

Subnormal parts or partial sums (which torch may flush to zero, ``torch.set_flush_denormal``)
send the caller back to the tensors.
"""

from __future__ import annotations

import operator
import threading
from array import array
from collections.abc import Callable, Sequence
from itertools import repeat

import torch
from torch import Tensor

__all__ = ["host_sum_of_squares"]

ROW_SUM_LIMIT = 16384
"""Elements, at most, of a tensor summed as a row of a stack (half torch's grain size)."""

STACK_ELEMENTS = 1 << 18
"""Elements of one stack at most (1 MiB of float32, in a second-level cache): its buffer is
kept per thread and dtype, so that no step maps fresh memory for it (a new 3 MB tensor cost
up to 2 ms of page faults, against 0.1 ms to fill it)."""

_TYPECODES = {torch.float32: "f", torch.float64: "d"}
_PLAIN = (Tensor, torch.nn.Parameter)
_DTYPE, _LAYOUT, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("layout"), operator.attrgetter("shape")
_IS_CPU, _REQUIRES_GRAD = operator.attrgetter("is_cpu"), operator.attrgetter("requires_grad")


def host_sum_of_squares(tensors: Sequence[Tensor], sum_of_squares: Callable[[Tensor], Tensor]) -> Tensor | None:
    """``sum_of_squares(t)`` (the definition: ``torch.sum(t * t)`` for real tensors) of every
    tensor, added in order, as a 0-d tensor of their dtype; None
    unless the tensors are plain strided CPU tensors of one dtype, float32 or float64, that
    need no gradient, outside a step that torch.compile traces, and no subnormal number
    comes up (the caller then adds 0-d tensors)."""
    if len(tensors) < 2 or torch.compiler.is_compiling():
        return None
    dtype = tensors[0].dtype
    typecode = _TYPECODES.get(dtype)
    if (
        typecode is None
        or not all(map(_PLAIN.__contains__, map(type, tensors)))
        or not all(map(operator.is_, map(_DTYPE, tensors), repeat(dtype)))
        or not all(map(operator.is_, map(_LAYOUT, tensors), repeat(torch.strided)))
        or not all(map(_IS_CPU, tensors))
        or any(map(_REQUIRES_GRAD, tensors))
    ):
        return None
    values = _sums(tensors, sum_of_squares)
    # Sums of squares are >= 0 (or NaN), so the partial sums of normal numbers are normal.
    tiny = torch.finfo(dtype).tiny
    if any(0.0 < value < tiny for value in values):
        return None
    rounded = array(typecode, values[:1])
    for value in values[1:]:
        rounded[0] += value
    return torch.tensor(rounded[0], dtype=dtype)


def _sums(tensors: Sequence[Tensor], sum_of_squares: Callable[[Tensor], Tensor]) -> list[float]:
    """Each tensor's ``torch.sum(t * t)``, read to the host: short contiguous tensors of one
    shape as the rows of stacks, the others one by one by ``sum_of_squares``."""
    rows: dict[torch.Size, list[int]] = {}
    alone: list[int] = []
    numels = list(map(Tensor.numel, tensors))
    contiguous = map(Tensor.is_contiguous, tensors)
    for index, (shape, numel, dense) in enumerate(zip(map(_SHAPE, tensors), numels, contiguous, strict=True)):
        if dense and 0 < numel <= ROW_SUM_LIMIT:
            rows.setdefault(shape, []).append(index)
        else:
            alone.append(index)
    order: list[int] = []
    parts: list[Tensor] = []
    for shape, indices in rows.items():
        if len(indices) == 1:
            alone += indices
            continue
        numel = numels[indices[0]]
        per_stack = max(1, STACK_ELEMENTS // numel)
        scratch = _scratch(tensors[0].dtype)
        for start in range(0, len(indices), per_stack):
            some = indices[start : start + per_stack]
            stacked = scratch[: len(some) * numel].view(len(some), *shape)
            torch.stack([tensors[i] for i in some], out=stacked)
            torch.mul(stacked, stacked, out=stacked)
            parts.append(torch.sum(stacked.view(len(some), numel), dim=1))
            order += some
    if alone:
        parts.append(torch.stack([sum_of_squares(tensors[i]) for i in alone]))
        order += alone
    values = [0.0] * len(tensors)
    for index, value in zip(order, torch.cat(parts).tolist(), strict=True):
        values[index] = value
    return values


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, Tensor] = {}


_SCRATCH = _Scratch()


def _scratch(dtype: torch.dtype) -> Tensor:
    buffer = _SCRATCH.buffers.get(dtype)
    if buffer is None:
        with torch.inference_mode(False):  # made in inference mode, it would refuse writes outside it
            buffer = _SCRATCH.buffers[dtype] = torch.empty(STACK_ELEMENTS, dtype=dtype)
    return buffer
