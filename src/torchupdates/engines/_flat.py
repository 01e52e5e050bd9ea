"""Flat buffers: the parameters, gradients and state of many tensors in one tensor each.

A fused kernel reads and writes one long buffer per role (parameters, gradients, each state
entry) instead of hundreds of tensors. Each member tensor owns a range of its bucket's buffers,
laid out in the member's own memory order (so a channels_last weight, its gradient and its state
line up element for element), and the tensors the user sees can be *adopted*: turned into views
of that range (``p.data = view``), so that a step needs no copies at all.

Nothing here trusts that an adopted tensor stays adopted. Users and frameworks replace tensors
(``zero_grad`` sets ``.grad`` to None, DDP writes its own gradient buckets, ``model.to()``
reassigns ``p.data``, ``load_state_dict`` replaces state tensors), so every step compares each
tensor with its range and copies the ones that moved (:meth:`FlatBucket.gather`); what the kernel
computed for a tensor that is not a view is copied back (:meth:`FlatBucket.scatter_pairs`).
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_Item = TypeVar("_Item")


def local(tensor: Tensor) -> Tensor:
    """The plain tensor holding this process's elements (a DTensor's shard)."""
    return getattr(tensor, "_local_tensor", tensor)


def storage_address(tensor: Tensor) -> int | None:
    """Where the tensor's storage begins (tensors sharing memory share storage), a DTensor's
    shard's for a DTensor; None when it has no storage this can read."""
    try:
        return int(local(tensor).untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def flat_alias(tensor: Tensor, start: int, length: int) -> Tensor:
    """``length`` elements of a dense tensor's memory from its element ``start`` on (in
    memory order), as a 1-D tensor that is not a view: made by ``set_`` on its storage.
    ``torch.compile`` guards a view input on its base, so kernels called on slices of
    different tensors would be compiled again and again; tensors like this one look like
    the whole buffers a kernel is first compiled for."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset() + start, (length,), (1,))


def real(tensor: Tensor) -> Tensor:
    """A complex tensor viewed as real (a trailing dimension of 2); others unchanged."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def dense_strides(tensor: Tensor) -> tuple[int, ...] | None:
    """The tensor's strides when its elements fill a block of memory without gaps or overlap
    (contiguous, channels_last, any permutation), else ``None``. An empty tensor has no
    elements to misplace: its strides, whatever they are."""
    if tensor.numel() == 0:
        return tuple(tensor.stride())
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return None
        expected *= size
    return tuple(tensor.stride())


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Span:
    """Where one member's elements lie in its bucket's buffers, and in which order."""

    offset: int
    shape: tuple[int, ...]  # of the real view
    strides: tuple[int, ...]
    complex_dtype: torch.dtype | None  # the member's dtype when it is complex

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def view(self, flat: Tensor) -> Tensor:
        """The member's tensor inside ``flat``, shaped and strided like the member."""
        viewed = flat.as_strided(self.shape, self.strides, flat.storage_offset() + self.offset)
        return torch.view_as_complex(viewed) if self.complex_dtype is not None else viewed


def _span(tensor: Tensor, offset: int) -> Span:
    view = real(local(tensor))
    strides = dense_strides(view) or contiguous_strides(view.shape)
    return Span(offset, tuple(view.shape), strides, tensor.dtype if tensor.is_complex() else None)


class FlatBucket:
    """The buffers of one batch of parameters: one per role, each with a range per member.

    Parameters
    ----------
    params : sequence of Tensor
        The members, in the order the step's slots list them.
    roles : dict
        Role name (``"param"``, ``"grad"``, a state key) -> the real dtype of its buffer.
    device : torch.device
        Where the buffers live.
    parallel_elements : int
        From this many elements on, a CPU kernel over the buffers should use threads.
    large_first_from : int, optional
        Members of at least this many (real) elements get the first ranges, the others
        follow, each part in the members' order: the small members lie side by side, so
        that a kernel run in pieces (:meth:`pieces`) or in packed groups needs fewer calls
        when a model interleaves weights and biases. None: ranges in the members' order.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        roles: dict[str, torch.dtype],
        device: torch.device,
        parallel_elements: int,
        large_first_from: int | None = None,
    ) -> None:
        self.params = list(params)
        self.device = device
        sizes = [real(local(param)).numel() for param in self.params]
        large = [] if large_first_from is None else [i for i, n in enumerate(sizes) if n >= large_first_from]
        taken = set(large)
        self.memory_order = large + [i for i in range(len(sizes)) if i not in taken]
        """Member indices in the order of their ranges."""
        self._in_order = not large or large == list(range(len(large)))
        offsets = [0] * len(sizes)
        total = 0
        for index in self.memory_order:
            offsets[index] = total
            total += sizes[index]
        self.spans = [_span(param, offset) for param, offset in zip(self.params, offsets, strict=True)]
        self.numel = total
        self.parallel = device.type != "cpu" or total >= parallel_elements
        self.roles = dict(roles)
        # Made role by role as the first step fills them (:meth:`take`), and listed in the
        # order of ``roles`` (the order kernels take them in) whatever the order they were made.
        self.buffers: dict[str, Tensor] = {}
        self.counters: dict[str, Tensor] = {}
        self._views: dict[str, list[Tensor]] = {}
        # Per role, the tensor last seen in each range (a view of it) and the range's address.
        self._held: dict[str, list[Tensor | None]] = {role: [None] * len(self.params) for role in roles}
        self._addresses: dict[str, list[int]] = {}

    def _buffer(self, role: str) -> Tensor:
        """``role``'s buffer, made at its first use. It is left uninitialised (every range is
        copied in before any kernel reads it), so on the CPU its memory is only claimed as
        ranges are written, while the tensors they replace are freed one by one."""
        buffer = self.buffers.get(role)
        if buffer is None:
            # Dynamic-shape kernels specialise on lengths 0 and 1; a length of at least 2 avoids
            # a second compilation for a bucket of one scalar. The padding is zeros (the
            # finiteness check of skip_nonfinite sums whole gradient buffers).
            buffer = torch.empty(max(self.numel, 2), dtype=self.roles[role], device=self.device)
            buffer[self.numel :].zero_()
            made = {**self.buffers, role: buffer}
            self.buffers = {name: made[name] for name in self.roles if name in made}  # in the roles' order
            self._addresses[role] = [buffer.data_ptr() + span.offset * buffer.element_size() for span in self.spans]
        return buffer

    def set_counters(self, key: str, value: int, counters: Sequence[Tensor]) -> bool:
        """Write ``value`` into every member's step counter under ``key`` with one fill:
        the counters (0-d int64 tensors) become views of one buffer the first time. Return
        whether all of them are such views."""
        buffer = self.counters.get(key)
        if buffer is None:
            buffer = self.counters[key] = torch.zeros(len(self.params), dtype=torch.int64, device=counters[0].device)
        buffer.fill_(value)
        held = self._held.setdefault(key, [None] * len(self.params))
        adopted = True
        for i, counter in enumerate(counters):
            if counter is held[i] and counter.data_ptr() == buffer.data_ptr() + buffer.element_size() * i:
                continue
            if type(counter) in PLAIN_TENSORS and counter.dtype == torch.int64 and counter.device == buffer.device:
                counter.data = buffer.as_strided((), (), i)
                held[i] = counter
            else:
                counter.fill_(value)
                adopted = False
        return adopted

    def view(self, role: str, index: int) -> Tensor:
        return self.spans[index].view(self._buffer(role))

    def in_memory_order(self, items: Sequence[_Item]) -> Sequence[_Item]:
        """``items``, one per member, in the order of the members' ranges."""
        return items if self._in_order else [items[i] for i in self.memory_order]

    def _offset(self, index: int) -> int:
        return self.spans[index].offset

    def readable_in_place(self, role: str, index: int, tensor: Tensor) -> bool:
        """Whether a kernel may read member ``index``'s ``role`` from ``tensor`` where it is
        instead of from its range: a plain tensor of the buffer's dtype, laid out as the range
        in memory, and outside every buffer (a kernel writes the buffers as it reads)."""
        if type(tensor) not in PLAIN_TENSORS:
            return False
        view = real(tensor)
        if view.dtype != self.roles[role] or view.device != self.device:
            return False
        if dense_strides(view) != self.spans[index].strides:
            return False
        low = view.data_ptr()
        high = low + view.numel() * view.element_size()
        return all(
            high <= buffer.data_ptr() or buffer.data_ptr() + buffer.numel() * buffer.element_size() <= low
            for buffer in self.buffers.values()
        )

    def keep_pieces_long(self, outside: Sequence[int]) -> list[int]:
        """The members of ``outside`` left after dropping those that would leave a stretch of
        one element between them (:meth:`pieces`): a kernel with dynamic shapes is compiled
        again for length 1. A dropped member joins the stretches around it."""
        kept: list[int] = []
        end = 0
        for index in sorted(outside, key=self._offset):
            span = self.spans[index]
            if span.offset - end == 1:
                continue
            kept.append(index)
            end = span.offset + span.numel
        length = max(self.numel, 2)
        if kept and length - (self.spans[kept[-1]].offset + self.spans[kept[-1]].numel) == 1:
            kept.pop()
        return kept

    def pieces(self, role: str, outside: Mapping[int, Tensor]) -> Iterator[list[Tensor]]:
        """The buffers cut for a kernel that reads members ``outside`` (index -> tensor) from
        those tensors: each piece is one 1-D tensor per role, in the buffers' order, either a
        stretch of the buffers between such members or one member's ranges with its tensor
        (in memory order) in place of ``role``'s range. Stretches are never one element long
        when ``outside`` was chosen by :meth:`keep_pieces_long`."""
        self._buffer(role)  # (made untouched when every range of it is read elsewhere)
        buffers = list(self.buffers.values())
        position = list(self.buffers).index(role)
        start = 0
        for index in sorted(outside, key=self._offset):
            span = self.spans[index]
            if span.offset > start:
                yield [flat_alias(buffer, start, span.offset - start) for buffer in buffers]
            piece = [flat_alias(buffer, span.offset, span.numel) for buffer in buffers]
            piece[position] = flat_alias(real(outside[index]), 0, span.numel)
            yield piece
            start = span.offset + span.numel
        if start < buffers[0].numel():
            yield [flat_alias(buffer, start, buffers[0].numel() - start) for buffer in buffers]

    def views(self, role: str) -> list[Tensor]:
        """Every member's range of ``role``'s buffer, made once (new tensors, never handed to
        the user: only the engine reads and writes through them)."""
        views = self._views.get(role)
        if views is None:
            views = self._views[role] = [span.view(self._buffer(role)) for span in self.spans]
        return views

    def holds(self, role: str, index: int, tensor: Tensor) -> bool:
        """Whether ``tensor`` is exactly member ``index``'s range of ``role``'s buffer."""
        if role not in self.buffers:
            return False
        if tensor is self._held[role][index]:
            # The same tensor object: only ``.data`` reassignment can have moved it.
            return tensor.data_ptr() == self._addresses[role][index]
        if type(tensor) not in PLAIN_TENSORS:
            return False
        span = self.spans[index]
        view = real(tensor)
        held = (
            view.dtype == self.buffers[role].dtype
            and view.data_ptr() == self._addresses[role][index]
            and tuple(view.shape) == span.shape
            and tuple(view.stride()) == span.strides
        )
        if held:
            self._held[role][index] = tensor
        return held

    def gather(self, role: str, tensors: Sequence[Tensor], skip: Container[int] = ()) -> list[int]:
        """Copy into the buffer every tensor that is not already its own range (but those of
        members ``skip``); return their member indices (those whose results must be copied
        back, unless adopted)."""
        moved = [i for i, tensor in enumerate(tensors) if i not in skip and not self.holds(role, i, tensor)]
        with torch.no_grad():
            for i in moved:
                self.view(role, i).copy_(local(tensors[i]))
        return moved

    def take(self, role: str, tensors: Sequence[Tensor]) -> list[int]:
        """:meth:`gather` the tensors and :meth:`adopt` each one as soon as it is copied, so
        that the memory it leaves is free before the next is copied: the first step needs
        about one tensor more than the tensors themselves, not a second copy of them all.
        Return the members that could not be adopted (their results are copied back)."""
        kept = []
        with torch.no_grad():
            for i, tensor in enumerate(tensors):
                if self.holds(role, i, tensor):
                    continue
                self.view(role, i).copy_(local(tensor))
                if not self.adopt(role, i, tensor):
                    kept.append(i)
        return kept

    def adopt(self, role: str, index: int, tensor: Tensor) -> bool:
        """Make ``tensor`` a view of its range (``tensor.data = view``) when it is a plain
        tensor laid out like the range; return whether it was."""
        if type(tensor) not in PLAIN_TENSORS or dense_strides(real(tensor)) != self.spans[index].strides:
            return False
        tensor.data = self.view(role, index)
        self._held[role][index] = tensor
        return True
