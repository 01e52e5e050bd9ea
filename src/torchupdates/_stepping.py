"""One step, from its gradients to the tensors it writes.

:meth:`Optimizer.step` and :meth:`Optimizer.updates` check the options and param groups, then
come here: the gradients are gathered and checked (``_slots``), the guards clip or skip
(``_guards``), missing state is created, each parameter becomes a slot, and the engine runs
the chain of formulas over the slots, batch by batch. Chains with a norm constraint run in
segments (``_segments``). :func:`step_again` is the steady state of the engines that keep
flat buffers (the compiled engine; the foreach engine on CPU and CUDA), which skips the
per-parameter work when nothing changed since the last step.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ._groups import stage_values
from ._guards import SCALE_GRADIENTS, guard, kept
from ._segments import constrain_written, ends_per_tensor, is_per_tensor, run_in_segments
from ._slots import LossOrGrads, checked_gradients, make_slot, traced_batches, unaliased
from .engines import Batch, Stage
from .engines.compiled import CompiledEngine

if TYPE_CHECKING:
    from .optimizer import Optimizer

__all__ = ["proposals", "step_again"]


def proposals(opt: Optimizer, loss_or_grads: LossOrGrads, write: bool, traced: bool) -> Iterator[Batch]:
    """The engine's batches of one step of ``opt``, whose options and groups are checked;
    none when ``skip_nonfinite`` skips the step. With ``write``, the engine may write some
    itself; the caller writes every pair it yields."""
    checked = checked_gradients(loss_or_grads, opt.param_groups, opt._stages, opt.rule_name)
    if write and not traced:
        checked = unaliased(checked, opt.state)
    # A final norm constraint on a step that writes: the engine writes the stages before
    # it, then the constraint rescales the written parameters (see _segments).
    final = opt._stages[-1] if write and not traced and ends_per_tensor(opt._stages) else None
    segmented = final is None and any(map(is_per_tensor, opt._stages))
    params, grads = [param for *_, param, _ in checked], [grad for *_, grad in checked]
    guarded = _guarded(
        opt, params, grads, fold=not segmented, traced=traced, stages=opt._stages[:-1] if final else None
    )
    if guarded is None:
        return
    grads, stages, values, keep = guarded
    checked = [(*entry[:3], grad) for entry, grad in zip(checked, grads, strict=True)]
    opt._init_group(tuple(position for position, *_ in checked))  # every input checked
    if segmented:
        engine = opt._engine_runner()
        propose = traced_batches if traced else lambda stages, slots, values: engine(stages, slots, values, False)
        with torch.no_grad():
            batches: Iterable[Batch] = [
                run_in_segments(opt._stages, checked, opt.state, opt.param_groups, opt.state_dtype, traced, propose)
            ]
            yield from batches if keep is None else map(partial(kept, keep), batches)
        return
    slots = [
        make_slot(position, group, param, grad, opt.state[param], stages, opt.state_dtype, traced)
        for position, group, param, grad in checked
    ]
    with torch.no_grad():
        if not traced:
            yield from opt._engine_runner()(stages, slots, values, write)
            if final is not None:
                constrain_written(final, [entry[:3] for entry in checked], opt.param_groups)
            return
        batches = traced_batches(stages, slots, values)
        yield from batches if keep is None else map(partial(kept, keep), batches)


def _guarded(
    opt: Optimizer,
    params: list[Tensor],
    grads: list[Tensor],
    fold: bool,
    traced: bool = False,
    stages: tuple[Stage, ...] | None = None,
    check: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], tuple[Stage, ...], list[list[dict[str, Any]]], Tensor | None] | None:
    """The gradients, stages and hyperparameters of a step after ``max_grad_norm`` and
    ``skip_nonfinite`` (see :mod:`torchupdates._guards`), and in a traced step whether to
    keep it; None for a skipped step (counted). ``fold``: the engines may apply the
    clipping factor themselves. ``stages``: the chain the engine runs (default: all).
    ``check``: what to check for finiteness instead of ``grads`` (same values)."""
    guarded = guard(params, grads, opt.max_grad_norm, opt.skip_nonfinite, opt.state_dtype, fold, traced, check)
    if not opt._guards.note(guarded) or guarded.grads is None:
        return None
    stages = opt._stages if stages is None else stages
    values = stage_values(opt.param_groups, stages)
    if guarded.scale is not None:
        stages = (SCALE_GRADIENTS, *stages)
        values = [[{"scale": guarded.scale}, *group_values] for group_values in values]
    return guarded.grads, stages, values, guarded.keep


def step_again(opt: Optimizer, given: Sequence[Tensor | None] | None = None) -> bool:
    """The flat-buffer engines' steady state: step ``opt`` from ``.grad``, or from ``given``
    gradients (one per parameter, in the groups' order, ``None`` to skip one), without
    building slots when the engine can prove nothing changed since its last step. Say whether
    it stepped (or skipped the step: ``skip_nonfinite``); False leaves everything as it was."""
    engine = opt._engine_runner()
    final = opt._stages[-1] if ends_per_tensor(opt._stages) else None
    if (
        not isinstance(engine, CompiledEngine)
        or not engine.may_repeat()
        or (final is None and any(map(is_per_tensor, opt._stages)))
        or not opt.param_groups
    ):
        return False
    if given is None:
        live, live_grads = zip(*map(_with_gradients, opt.param_groups), strict=True)
    else:
        per_group = _per_group(opt.param_groups, given)
        live, live_grads = zip(*map(_with_gradients, opt.param_groups, per_group), strict=True)
    plan = engine.prepare_repeat(live, live_grads, opt.state, given is not None)
    if plan is None:
        return False
    guards = opt.max_grad_norm is not None or opt.skip_nonfinite
    params = [p for group_params in live for p in group_params] if guards else []
    grads = [g for group_grads in live_grads for g in group_grads] if guards else []
    body = opt._stages[:-1] if final else None
    guarded = _guarded(opt, params, grads, fold=True, stages=body, check=plan.gradient_buffers())
    if guarded is None:
        return True
    guarded_grads, stages, values, _ = guarded
    if any(map(operator.is_not, guarded_grads, grads)):
        return False  # clipped copies: the kernels take the gradients in their buffers
    with torch.no_grad():
        if not engine.run_repeat(plan, stages, values):
            return False
        if final is not None:
            constrain_written(final, _positions(opt.param_groups, live), opt.param_groups)
    return True


_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _per_group(groups: Sequence[Mapping[str, Any]], grads: Sequence[Tensor | None]) -> list[Sequence[Tensor | None]]:
    """A flat list of one gradient per parameter, cut into the groups'."""
    cut, start = [], 0
    for group in groups:
        cut.append(grads[start : start + len(group["params"])])
        start += len(group["params"])
    return cut


def _with_gradients(
    group: Mapping[str, Any], given: Sequence[Tensor | None] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """The group's parameters that a step updates (they have a gradient and require one),
    and their gradients (``.grad``, or those ``given``), each attribute read once by a
    C-level loop: with thousands of small tensors, these reads are most of the steady
    state's time."""
    params: list[Tensor] = group["params"]
    grads: list[Tensor | None] = list(map(_GRAD, params)) if given is None else list(given)
    if all(map(_REQUIRES_GRAD, params)) and not any(map(operator.is_, grads, repeat(None))):
        return params, cast("list[Tensor]", grads)
    kept = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None and p.requires_grad]
    return [p for p, _ in kept], [g for _, g in kept]


def _positions(groups: Sequence[Mapping[str, Any]], live: Sequence[Sequence[Tensor]]) -> list[tuple[int, int, Tensor]]:
    """``(flat position, group index, parameter)`` of the parameters in ``live`` (per group)."""
    positions, start = [], 0
    for index, (group, group_live) in enumerate(zip(groups, live, strict=True)):
        stepped = {id(p) for p in group_live}
        positions += [(start + i, index, p) for i, p in enumerate(group["params"]) if id(p) in stepped]
        start += len(group["params"])
    return positions
