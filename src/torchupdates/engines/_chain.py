"""What every engine shares: the per-parameter inputs of a step and the chain of formulas."""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar, cast

import torch
from torch import Tensor

from ..formula import Scalar, ScalarTape, Value
from ..transform import Transform


@dataclass(frozen=True)
class Stage:
    """One transform in an optimizer's chain, with the keys it uses in groups and state.

    Attributes
    ----------
    transform : Transform
        The rule (first stage) or a modifier (later stages).
    hyper_keys : dict
        Local hyperparameter name -> key in each param group (``learning_rate`` -> ``lr``).
    state_keys : dict
        Local state name -> key in ``optimizer.state[param]``.
    step_key : str or None
        Key of the step counter, for transforms that count steps.
    members : frozenset of int or None
        Positions (in the optimizer's flat parameter order) the stage applies to; ``None``
        for all parameters.
    """

    transform: Transform
    hyper_keys: dict[str, str]
    state_keys: dict[str, str]
    step_key: str | None
    members: frozenset[int] | None

    def applies_to(self, position: int) -> bool:
        return self.members is None or position in self.members


@dataclass(frozen=True)
class Slot:
    """The inputs of one parameter for one step, already validated.

    ``steps[i]`` is the 1-based step number ``t`` for stage ``i`` (``None`` when the stage
    does not count steps or does not apply); ``applies[i]`` says whether stage ``i`` acts.
    ``state`` holds the formulas' state tensors by state key, ``counters`` the step
    counters; ``work_dtype`` is the dtype the arithmetic runs in (the state's dtype).
    """

    param: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    counters: dict[str, Tensor]
    group: int
    steps: tuple[int | None, ...]
    applies: tuple[bool, ...]
    work_dtype: torch.dtype


Pairs = list[tuple[Tensor, Tensor]]
"""(target, proposed new value) for one parameter: itself, its state, its step counters."""

Batch = list[tuple[int, Pairs]]
"""The pairs of some slots, each with the slot's index in the step's slot list."""


def run_chain(
    stages: Sequence[Stage],
    hyperparameters: Sequence[dict[str, Any]],
    param: Value,
    grad: Value,
    state: dict[str, Value],
    steps: Sequence[int | None],
    applies: Sequence[bool],
) -> tuple[Value, dict[str, Value]]:
    """Run the rule and then each modifier, each on the previous stage's proposal.

    Returns the final proposal for the parameter and the new value of every state entry
    (by state key) that a stage computed.
    """
    incoming = grad
    new_state: dict[str, Value] = {}
    for stage, hp, t, acts in zip(stages, hyperparameters, steps, applies, strict=True):
        if not acts:
            continue
        local = {name: state[key] for name, key in stage.state_keys.items()}
        incoming, computed = stage.transform.formula(param, incoming, local, t, **hp)
        for name, value in computed.items():
            new_state[stage.state_keys[name]] = value
    return incoming, new_state


def recording_key(
    stages: Sequence[Stage],
    hyperparameters: Sequence[dict[str, Any]],
    steps: Sequence[int | None],
    applies: Sequence[bool],
    work_dtype: torch.dtype,
) -> tuple[Any, ...] | None:
    """What a recording of the chain is made from, when that is all, so that an engine may
    keep what it made from one (a program and its constants) for the next step: ``None``
    when a hyperparameter is not a Python number (a tensor's value can change in place).
    Floats are keyed by their exact bits, so that 0.0 and -0.0 differ. The stages are keyed
    by identity: a keeper must keep them alive, so that their ids stay theirs.

    Step numbers are not part of the key, only which stages count steps: they change the
    recording's scalars (a bias correction), never its wiring, so a kept program serves a
    later step with that step's scalars, read by :func:`step_scalars`."""
    values: list[tuple[str, object]] = []
    for group in hyperparameters:
        for name, value in group.items():
            if type(value) is float:
                values.append((name, value.hex()))
            elif type(value) is int:
                values.append((name, value))
            else:
                return None
    counting = tuple(t is not None for t in steps)
    return (tuple(map(id, stages)), tuple(values), tuple(applies), counting, work_dtype)


def counts_steps(steps: Sequence[int | None]) -> bool:
    """Whether a stage of the chain counts steps (its scalars then change at every step)."""
    return any(t is not None for t in steps)


def step_scalars(
    stages: Sequence[Stage],
    hyperparameters: Sequence[dict[str, Any]],
    steps: Sequence[int | None],
    applies: Sequence[bool],
    state_keys: Sequence[str],
) -> tuple[Scalar, ...]:
    """The scalars a recording of the chain with these step numbers holds, in the order of
    :meth:`~torchupdates.formula.Graph.scalars`, read without recording it (a
    :class:`~torchupdates.formula.ScalarTape`)."""
    tape = ScalarTape()
    param, grad = tape.leaf(), tape.leaf()
    state: dict[str, Value] = {key: tape.leaf() for key in state_keys}
    run_chain(stages, hyperparameters, param, grad, state, steps, applies)
    return tape.scalars()


_Made = TypeVar("_Made")


class StepNumbers(threading.local):
    """0-d CPU tensors for the scalars of a kept recording whose chain counts steps, the same
    tensors at every step, with each step's values written into them.

    A step-dependent scalar (Adam's bias-corrected rate) is a new number at every step: a
    new tensor for it costs about 2.5 µs with warm caches and tens of µs with cold ones (as
    after a backward pass), and would fill :func:`number_tensor`'s cache with values never
    asked for again. Writing into a kept tensor through NumPy costs about 0.1 µs, and only
    the values that changed since the last step are written (Adam: one of six). The tensors
    hold their values until the next :meth:`hold` of the same recording: each engine hands
    them to its kernels before it asks again. Per thread, so that optimizers stepping in
    different threads never write into each other's.
    """

    def __init__(self) -> None:
        self.tensors: tuple[Tensor, ...] = ()
        self._dtype: torch.dtype | None = None
        self._writers: list[Callable[[float], None]] = []
        self._written: list[float] = []

    def hold(self, values: Sequence[Scalar], dtype: torch.dtype) -> tuple[Tensor, ...] | None:
        """``values`` as 0-d CPU tensors of ``dtype``, each rounded to it as
        ``torch.tensor(value, dtype=dtype)`` rounds it; None, writing nothing, unless every
        value is a Python number (the caller then makes its tensors its own way)."""
        if not all(isinstance(value, (int, float)) for value in values):
            return None
        if len(self.tensors) != len(values) or self._dtype != dtype:
            with torch.inference_mode(False):  # made in inference mode, they would refuse writes outside it
                self.tensors = tuple(torch.empty((), dtype=dtype) for _ in values)
            self._dtype = dtype
            self._writers = [_writer(tensor) for tensor in self.tensors]
            self._written = [math.nan] * len(values)
        written = self._written
        for position, value in enumerate(values):
            # Equal numbers have equal bits but for zeros (0.0 == -0.0) and NaN (never equal).
            if value != written[position] or value == 0:
                self._writers[position](float(cast(float, value)))
                written[position] = cast(float, value)
        return self.tensors


def _writer(tensor: Tensor) -> Callable[[float], None]:
    """Write a number into the 0-d CPU ``tensor``: through NumPy where it is installed, else
    by ``fill_``; a number beyond the dtype's range (or NaN) by a copy from float64, which
    rounds it as ``torch.tensor`` does (NumPy warns on such a cast, ``fill_`` refuses it)."""
    largest = torch.finfo(tensor.dtype).max
    try:
        array = tensor.numpy()
    except (ImportError, RuntimeError):  # torch built without NumPy, or NumPy missing
        array = None

    def write(value: float) -> None:
        if not -largest <= value <= largest:
            tensor.copy_(torch.tensor(value, dtype=torch.float64))
        elif array is not None:
            array[()] = value
        else:
            tensor.fill_(value)

    return write


class KeptRecordings(Generic[_Made]):
    """What an engine made from a recording, kept by its :func:`recording_key` (extended
    with the engine's own inputs), at most ``limit`` of them, then emptied. Each entry keeps
    its stages alive, so that their ids, part of the key, stay theirs, and its
    :class:`StepNumbers` for the later steps of a chain that counts steps."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._kept: dict[Hashable, tuple[tuple[Stage, ...], _Made, StepNumbers]] = {}

    def get(self, key: Hashable | None, stages: Sequence[Stage]) -> tuple[_Made, StepNumbers] | None:
        """What was kept under ``key`` for these very stages, with its step numbers, or ``None``."""
        kept = self._kept.get(key) if key is not None else None
        if kept is None or not all(map(operator.is_, kept[0], stages)):
            return None
        return kept[1], kept[2]

    def put(self, key: Hashable | None, stages: Sequence[Stage], made: _Made) -> None:
        """Keep ``made`` under ``key`` (nothing when there is no key)."""
        if key is None:
            return
        if len(self._kept) >= self._limit:
            self._kept.clear()  # one atomic step, whatever other threads do meanwhile
        self._kept[key] = (tuple(stages), made, StepNumbers())


def fits(grad: object, param: Tensor) -> TypeGuard[Tensor]:
    """Whether ``grad`` is a dense tensor of ``param``'s shape, dtype and device: a gradient a
    step takes as it is (anything else is densified or refused by the step's checks)."""
    return (
        isinstance(grad, Tensor)
        and grad.layout == torch.strided
        and grad.dtype == param.dtype
        and grad.shape == param.shape
        and grad.device == param.device
    )


def to_work(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """The real-valued view of ``tensor`` in the working dtype (no copy when it already is).

    A 0-d tensor is viewed as shape ``(1,)``: between two 0-d tensors torch promotes to the
    wider dtype, so a float64 0-d hyperparameter would otherwise turn a 0-d float32
    parameter's arithmetic into float64.
    """
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if tensor.dim() == 0:
        tensor = tensor.unsqueeze(0)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def from_work(value: Tensor, like: Tensor) -> Tensor:
    """Undo :func:`to_work`: a tensor with the shape, dtype and complexness of ``like``."""
    if like.is_complex():
        real_dtype = torch.view_as_real(like).dtype
        return torch.view_as_complex(value.to(real_dtype).contiguous())
    if value.shape != like.shape:
        value = value.reshape(like.shape)
    return value if value.dtype == like.dtype else value.to(like.dtype)


def pairs_for_slot(stages: Sequence[Stage], slot: Slot, proposal: Tensor | None, new_state: dict[str, Tensor]) -> Pairs:
    """The (target, new value) pairs of one parameter: itself (unless ``proposal`` is
    ``None``: already written), the state entries given, and its step counters."""
    pairs = [] if proposal is None else [(slot.param, from_work(proposal, slot.param))]
    for key, value in new_state.items():
        target = slot.state[key]
        pairs.append((target, from_work(value, target)))
    for stage, t in zip(stages, slot.steps, strict=True):
        if stage.step_key is not None and t is not None:
            counter = slot.counters[stage.step_key]
            pairs.append((counter, torch.full_like(counter, t)))
    return pairs


def number_tensor(position: int, value: float, dtype: torch.dtype) -> Tensor:
    """A 0-d CPU tensor of ``dtype`` holding ``value`` rounded to it, for the scalar operand
    at ``position`` of one call. Never written to (engines only read their scalars), it is
    kept and handed out again for the same position, value and dtype: the same numbers recur
    at every step (a learning rate, ``1 - rho``), and making a tensor costs microseconds. One
    call asking for several positions gets distinct tensors even for equal values."""
    key = (position, value, dtype)
    # 0.0 equals -0.0 and NaN equals nothing: their tensors are made afresh.
    kept = value and value == value
    tensor = _NUMBERS.get(key) if kept else None
    if tensor is None:
        tensor = torch.tensor(value, dtype=dtype)
        if kept:
            if len(_NUMBERS) >= _KEPT_NUMBERS:
                _NUMBERS.clear()  # one atomic step, whatever other threads do meanwhile
            _NUMBERS[key] = tensor
    return tensor


_KEPT_NUMBERS = 4096
_NUMBERS: dict[tuple[int, float, torch.dtype], Tensor] = {}
"""The tensors :func:`number_tensor` made, by position, value and dtype."""
