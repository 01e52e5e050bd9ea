"""Gradients and slots: the checked inputs of one step, per parameter, and its lazy state.

A step turns what it was given (a loss, a list of gradients or ``None`` for ``.grad``) into
one gradient per parameter, checks every gradient, and only then creates missing state
(zeros, in the working dtype) and builds each parameter's :class:`Slot`: so a bad input
raises before anything, state included, is written.

In a step traced by ``torch.compile`` a step counter is not read on the host: the step
number ``t`` is a 0-d float64 tensor (the counter plus one), the formulas compute their bias
corrections from it as tensors, and the counters advance by tensor operations
(:func:`traced_batches`). The caller decides once whether a step is traced and says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .engines import Batch, Slot, Stage
from .engines._chain import fits
from .engines._flat import storage_address
from .engines.reference import propose_reference
from .grads import compute_grads, describe, given_grads
from .transform import zero_state

__all__ = [
    "LossOrGrads",
    "checked_gradients",
    "init_state",
    "make_slot",
    "run_closure",
    "step_gradients",
    "traced_batches",
    "unaliased",
    "work_dtype",
]

LossOrGrads = Tensor | Sequence[Tensor | None] | Callable[[], Any] | None
"""What a step takes: a scalar loss, one gradient per parameter, a closure, or ``None``."""

Values = Sequence[Sequence[dict[str, Any]]]
"""``values[group][stage]``: hyperparameters by local name, as the engines take them."""

_ACCEPTED = "a scalar loss tensor, a list of gradients, a closure or None"


def run_closure(loss_or_grads: LossOrGrads, closure: Callable[[], Any] | None) -> tuple[Any, LossOrGrads]:
    """Call the closure (``closure``, or ``loss_or_grads`` when callable) with grad enabled;
    return its loss and what to take gradients from (``None``: ``.grad``)."""
    if closure is not None:
        if loss_or_grads is not None:
            raise TypeError("give either loss_or_grads or closure, not both")
        loss_or_grads = closure
    if callable(loss_or_grads) and not isinstance(loss_or_grads, Tensor):
        with torch.enable_grad():
            return loss_or_grads(), None
    return None, loss_or_grads


def work_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``param``'s arithmetic and state: its own (the real dtype of a complex
    parameter), or ``state_dtype`` when that is wider and ``param`` is real."""
    dtype = torch.view_as_real(param).dtype if param.is_complex() else param.dtype
    if state_dtype is not None and state_dtype.itemsize > dtype.itemsize and not param.is_complex():
        return state_dtype
    return dtype


def step_gradients(loss_or_grads: LossOrGrads, param_groups: Sequence[Mapping[str, Any]]) -> list[Tensor | None]:
    """One gradient (or ``None``) per parameter of ``param_groups``, in their order, as
    :func:`gradients` gives them (a loss differentiated now, a list's length checked)."""
    flat = [(index, param) for index, group in enumerate(param_groups) for param in group["params"]]
    return gradients(loss_or_grads, flat)


def gradients(loss_or_grads: LossOrGrads, flat: Sequence[tuple[int, Tensor]]) -> list[Tensor | None]:
    """One gradient (or ``None``) per ``(group index, parameter)`` of ``flat``.

    ``None`` reads ``.grad``; a loss is differentiated with respect to the parameters that
    require grad (the others get ``None``); a list is taken as it is. A closure must have
    been called already.
    """
    if loss_or_grads is None:
        return [param.grad for _, param in flat]
    given = given_grads(loss_or_grads, len(flat), _ACCEPTED)
    if not isinstance(given, Tensor):
        return given
    trainable = [(position, group, param) for position, (group, param) in enumerate(flat) if param.requires_grad]
    grads = compute_grads(
        given, [param for _, _, param in trainable], [describe(i, param, group) for i, group, param in trainable]
    )
    by_position = {position: grad for (position, _, _), grad in zip(trainable, grads, strict=True)}
    return [by_position.get(position) for position in range(len(flat))]


def checked_grad(position: int, group: int, param: Tensor, grad: object, sparse: bool, owner: str) -> Tensor:
    """``grad`` if it fits ``param`` (a sparse one, of any sparse layout, densified when
    ``sparse`` allows it), else a ``TypeError`` or ``ValueError`` that names the parameter
    and the problem."""
    if fits(grad, param):
        return grad
    name = describe(position, param, group)
    if not isinstance(grad, Tensor):
        raise TypeError(f"the gradient of {name} must be a tensor or None, got {type(grad).__name__}")
    if grad.layout != torch.strided:
        if not sparse:
            raise TypeError(f"{owner} does not support sparse gradients ({name} has a {grad.layout} gradient)")
        if grad.device.type == "meta" or grad.device != param.device:
            raise ValueError(f"the gradient of {name} is on {grad.device}, the parameter on {param.device}")
        return checked_grad(position, group, param, grad.to_dense(), sparse, owner)
    if grad.is_complex() != param.is_complex():
        kinds = ("complex", "real") if param.is_complex() else ("real", "complex")
        raise TypeError(f"{name} is {kinds[0]} but its gradient is {kinds[1]}; they cannot be mixed")
    if grad.shape != param.shape:
        raise ValueError(f"the gradient of {name} has shape {tuple(grad.shape)}")
    if grad.dtype != param.dtype:
        raise TypeError(f"the gradient of {name} has dtype {grad.dtype}; cast it to {param.dtype}")
    raise ValueError(f"the gradient of {name} is on {grad.device}, the parameter on {param.device}")


def checked_gradients(
    loss_or_grads: LossOrGrads, param_groups: Sequence[Mapping[str, Any]], stages: Sequence[Stage], owner: str
) -> list[tuple[int, int, Tensor, Tensor]]:
    """``(position, group index, parameter, gradient)`` of every parameter a step updates:
    those that require grad and have a gradient, each gradient checked.

    Parameters
    ----------
    loss_or_grads : Tensor, list of Tensor or None
        As :meth:`Optimizer.updates` takes it, a closure already called.
    param_groups : list of dict
        The optimizer's groups.
    stages : sequence of Stage
        The chain; its first stage says whether sparse gradients are accepted.
    owner : str
        The chain's name, for error messages.
    """
    flat = [(index, param) for index, group in enumerate(param_groups) for param in group["params"]]
    sparse = stages[0].transform.accepts_sparse
    return [
        (position, group, param, checked_grad(position, group, param, grad, sparse, owner))
        for position, ((group, param), grad) in enumerate(zip(flat, gradients(loss_or_grads, flat), strict=True))
        if grad is not None and param.requires_grad
    ]


def unaliased(
    checked: list[tuple[int, int, Tensor, Tensor]], state: Mapping[Tensor, Mapping[str, Any]]
) -> list[tuple[int, int, Tensor, Tensor]]:
    """The :func:`checked_gradients` entries of a step that writes, with a copy of each
    gradient sharing memory with a parameter or a state tensor of the step (a gradient that
    is another parameter, or its velocity): every gradient is then read as it was before the
    step wrote anything, as ``apply_updates(updates(x))`` reads it, in whatever order an
    engine writes its batches."""
    targets: set[int | None] = set()
    for _, _, param, _ in checked:
        targets.add(storage_address(param))
        targets.update(storage_address(value) for value in state.get(param, {}).values() if isinstance(value, Tensor))
    unknown = None in targets  # then any gradient might be a target's memory
    targets.add(None)  # and a gradient whose memory is unknown might be a target's
    return [
        (*entry[:3], entry[3].clone()) if unknown or storage_address(entry[3]) in targets else entry
        for entry in checked
    ]


def init_state(
    state: dict[str, Any], param: Tensor, position: int, stages: Sequence[Stage], state_dtype: torch.dtype | None
) -> None:
    """Create the missing state of the parameter at ``position``: zeros in its working dtype
    for every stage acting on it, and a 0-d int64 counter for those that count steps."""
    work = work_dtype(param, state_dtype)
    dtype = work if work != param.dtype and not param.is_complex() else None
    for stage in stages:
        if not stage.applies_to(position):
            continue
        for key in stage.state_keys.values():
            if key not in state:
                state[key] = zero_state(param, dtype)
        if stage.step_key is not None and stage.step_key not in state:
            state[stage.step_key] = torch.zeros((), dtype=torch.int64)


def make_slot(
    position: int,
    group: int,
    param: Tensor,
    grad: Tensor,
    state: Mapping[str, Any],
    stages: Sequence[Stage],
    state_dtype: torch.dtype | None,
    traced: bool,
) -> Slot:
    """One parameter's slot (its state made by :func:`init_state`). ``traced``: the step is
    being traced by ``torch.compile``, so step numbers are tensors (see the module notes)."""
    steps: list[int | Tensor | None] = []
    applies: list[bool] = []
    formula_state: dict[str, Tensor] = {}
    counters: dict[str, Tensor] = {}
    for stage in stages:
        acts = stage.applies_to(position)
        applies.append(acts)
        steps.append(None)
        if not acts:
            continue
        for key in stage.state_keys.values():
            formula_state[key] = _fitting_state(state[key], key, position, group, param)
        if stage.step_key is not None:
            counter = counters[stage.step_key] = state[stage.step_key]
            # t = counter + 1; traced, a tensor: reading the counter would break the graph.
            steps[-1] = counter.to(torch.float64) + 1 if traced else int(counter) + 1
    # Traced, step numbers are tensors; the formulas take either.
    numbers = cast("tuple[int | None, ...]", tuple(steps))
    work = work_dtype(param, state_dtype)
    return Slot(param, grad, formula_state, counters, group, numbers, tuple(applies), work)


def _fitting_state(tensor: Tensor, key: str, position: int, group: int, param: Tensor) -> Tensor:
    """The state tensor ``key`` of a parameter when it has the parameter's shape and device,
    else a ``ValueError``: the parameter was replaced (``p.data = ...``, a model moved) after
    its state was made, and no step may combine the two."""
    if tensor.shape == param.shape and tensor.device == param.device:
        return tensor
    raise ValueError(
        f"the state {key!r} of {describe(position, param, group)} has shape {tuple(tensor.shape)} on "
        f"{tensor.device}, the parameter {tuple(param.shape)} on {param.device}: the parameter changed after "
        "its state was made. After moving a model, opt.load_state_dict(opt.state_dict()) moves the state "
        "with it; a parameter of another shape needs a new optimizer"
    )


def traced_batches(stages: Sequence[Stage], slots: Sequence[Slot], values: Values) -> Iterator[Batch]:
    """The batches of a step traced by ``torch.compile``, whatever the optimizer's engine.

    The per-tensor formulas of the reference engine: the compiler batches and fuses them
    itself, and the other engines' batching and in-place writes are for eager runs (the
    foreach engine's tensor lists and its aliasing checks on storage pointers cannot be
    traced). The engine writes no counter, since its ``torch.full_like(counter, t)`` cannot
    take a traced step number; each batch gets the counters and their next values here.
    """
    uncounted = tuple(dataclasses.replace(stage, step_key=None) for stage in stages)
    for batch in propose_reference(uncounted, slots, values, traced=True):
        yield [
            (index, pairs + [(counter, counter + 1) for counter in slots[index].counters.values()])
            for index, pairs in batch
        ]
