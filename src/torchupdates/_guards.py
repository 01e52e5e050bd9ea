"""Step guards: the gradient clipping (``max_grad_norm``) and the non-finite check
(``skip_nonfinite``) that a step runs on its gradients before any rule sees them.

Both act on the step's gradients as a whole, after every gradient was checked and before any
state is created or written:

- clipping is :func:`~torchupdates.total_norm_constraint` of the gradients of every
  parameter the step updates, with its default epsilon. So a step with ``max_grad_norm=c``
  equals, bit for bit, ``opt.step(total_norm_constraint(grads, c))`` on an optimizer
  without it. For DTensor gradients (FSDP2) the norm is over every shard of every rank.
- the check asks whether any gradient (after clipping) holds a NaN or an infinity, with one
  read of the answer on the host per step. With clipping, a finite joint norm answers it:
  every gradient is then finite, and so are the clipped ones, scaled by at most 1. (A norm
  beyond the dtype's range makes the factor 0 and the clipped gradients zeros, finite where
  the gradients are: then, and without clipping, the next check decides.) One pass sums
  each gradient: a NaN or an infinity makes its sum one (the compiled engine's steady state
  sums its flat gradient buffers instead, one reduction each). Only when a sum is not
  finite, which adding very large finite values can also cause, does a second pass decide
  exactly, by ``sum(g * 0)``: 0 when ``g`` is finite and NaN otherwise (``inf * 0`` is NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from ._slots import work_dtype
from .constraints import clip_factor, joint_norm
from .engines import Batch, Stage
from .formula import Array, Scalar
from .transform import NON_NEGATIVE, Hyperparameter, Transform

__all__ = [
    "SCALE_GRADIENTS",
    "GuardRecord",
    "Guarded",
    "all_finite",
    "check_guard_options",
    "guard",
    "is_finite",
    "kept",
]


def _scale_gradients(
    param: Array, grad: Array, state: dict[str, Array], t: None, *, scale: Scalar
) -> tuple[Array, dict[str, Array]]:
    return grad * scale, {}


SCALE_GRADIENTS = Stage(
    Transform("max_grad_norm", (Hyperparameter("scale", None, NON_NEGATIVE),), (), _scale_gradients),
    {"scale": "scale"},
    {},
    None,
    None,
)
"""A stage put before the rule for one step: the rule then sees ``grad * scale``, the clipped
gradient, computed by the engine inside its fused pass instead of as new tensors first.
``grad * scale`` is the same operation, so the same rounding, as
:func:`~torchupdates.total_norm_constraint`'s ``tensor * multiplier``."""


@dataclass(frozen=True)
class Guarded:
    """What the guards make of one step's gradients.

    ``grads`` is None for a step to skip. ``scale`` is the clipping factor when the engines
    are to apply it (``grads`` are then the unclipped gradients), else None. ``keep`` is set
    in a step traced by ``torch.compile`` with ``skip_nonfinite``: a 0-d bool tensor, False
    for a step to skip, which the step applies to what it writes instead of reading it.
    """

    grads: list[Tensor] | None
    norm: Tensor | None
    scale: Tensor | None
    keep: Tensor | None = None


def guard(
    params: Sequence[Tensor],
    grads: list[Tensor],
    max_grad_norm: Scalar | None,
    skip_nonfinite: bool,
    state_dtype: torch.dtype | None,
    fold: bool,
    traced: bool = False,
    check: Sequence[Tensor] | None = None,
) -> Guarded:
    """Clip (``max_grad_norm``) and check (``skip_nonfinite``) a step's checked gradients.
    ``fold``: the chain can take the clipping factor as :data:`SCALE_GRADIENTS`; it does when
    every gradient is a plain dense real tensor already in its working dtype (elsewhere the
    factor would apply after a conversion, which rounds differently). ``traced``: decide
    nothing on the host (see :attr:`Guarded.keep`). ``check``: tensors holding exactly the
    gradients' values (the compiled engine's flat buffers), checked for finiteness instead."""
    if (max_grad_norm is None and not skip_nonfinite) or not grads:
        return Guarded(grads, None, None)
    norm = None if max_grad_norm is None else joint_norm(grads)
    keep = None
    if skip_nonfinite:
        if traced:
            # Not the probe sum(g * 0): a compiler may fold g * 0 into 0, NaN and infinity aside.
            keep = _all_finite_on_device(grads)
        elif not ((norm is not None and is_finite(norm)) or all_finite(grads if check is None else check)):
            return Guarded(None, norm, None)
    if norm is None or max_grad_norm is None:
        return Guarded(grads, None, None, keep)
    scale = clip_factor(norm, max_grad_norm)
    if fold and all(map(_in_working_dtype, params, grads, [state_dtype] * len(grads))):
        return Guarded(grads, norm, scale, keep)
    return Guarded([grad * scale for grad in grads], norm, None, keep)


class GuardRecord:
    """What the guards keep across steps: the last joint norm before clipping, and the number of
    skipped steps (counted on the host in eager steps, on the device in traced ones).

    Containers and in-place updates only: torch.compile keeps a traced step's store into a
    list and its in-place add, but drops a tensor stored as an attribute of the optimizer, and
    a tally created in a traced step would change what the next step reads (a recompile).
    """

    def __init__(self, device: torch.device | None) -> None:
        self.norm: list[Tensor | None] = [None]
        self.skipped = 0
        self.tally = torch.zeros((), dtype=torch.int64, device=device)

    def skipped_steps(self) -> int:
        return self.skipped + int(self.tally)

    def set_skipped_steps(self, value: int) -> None:
        self.skipped = value
        self.tally.zero_()

    def copy(self) -> GuardRecord:
        """A record of the same values, sharing no tensor or container with this one."""
        twin = GuardRecord(self.tally.device)
        twin.norm[0], twin.skipped = self.norm[0], self.skipped_steps()
        return twin

    def note(self, guarded: Guarded) -> bool:
        """Record one step's guard results; say whether the step goes ahead."""
        if guarded.norm is not None:
            self.norm[0] = guarded.norm
        if guarded.grads is None:
            self.skipped += 1
            return False
        if guarded.keep is not None:
            self.tally.add_(torch.logical_not(guarded.keep).to(torch.int64).to(self.tally.device))
        return True


def kept(keep: Tensor, batch: Batch) -> Batch:
    """``batch`` with each new value replaced by its target's current one unless ``keep``: a
    skipped step decided on the device, in a step traced by ``torch.compile``."""
    return [(index, [(target, torch.where(keep, value, target)) for target, value in pairs]) for index, pairs in batch]


def _in_working_dtype(param: Tensor, grad: Tensor, state_dtype: torch.dtype | None) -> bool:
    return (
        type(grad) is Tensor
        and grad.layout == torch.strided
        and not grad.is_complex()
        and work_dtype(param, state_dtype) == grad.dtype
    )


def check_guard_options(skip_nonfinite: object, max_grad_norm: object, read_tensor: bool = True) -> None:
    """Raise a ``TypeError`` or ``ValueError`` naming the option unless both are valid.
    ``read_tensor=False`` (a step traced by ``torch.compile``, where reading a value would
    break the graph): a 0-d tensor ``max_grad_norm`` is checked for its kind, not its value,
    as the hyperparameters are."""
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    if max_grad_norm is None:
        return
    if isinstance(max_grad_norm, Tensor):
        if max_grad_norm.dim() != 0 or not max_grad_norm.is_floating_point():
            raise TypeError(f"max_grad_norm must be a number or a floating-point 0-d tensor, got {max_grad_norm!r}")
        if not read_tensor:
            return
        value = float(max_grad_norm)
    elif isinstance(max_grad_norm, Real) and not isinstance(max_grad_norm, bool):
        value = float(max_grad_norm)
    else:
        raise TypeError(f"max_grad_norm must be None, a number or a 0-d tensor, got {type(max_grad_norm).__name__}")
    if not value > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None: no clipping), got {value!r}")


def all_finite(grads: Sequence[Tensor]) -> bool:
    """Whether every element of every gradient is finite (all ranks' shards of a DTensor)."""
    if not grads:
        return True
    plain = [grad for grad in grads if type(grad) is Tensor and grad.layout == torch.strided]
    if len(plain) == len(grads) and _sums_are_finite(plain):
        return True
    return bool(_finite(_nonfinite_probe(grads)))


def _all_finite_on_device(grads: Sequence[Tensor]) -> Tensor:
    """Whether every gradient is finite, as a 0-d bool tensor (no host read)."""
    verdict = torch.isfinite(grads[0]).all()
    for grad in grads[1:]:
        verdict = verdict & torch.isfinite(grad).all().to(verdict.device)
    return verdict


def _sums_are_finite(grads: list[Tensor]) -> bool:
    """True when every gradient's sum is finite, which proves every element finite (a NaN or
    an infinity makes its sum one). False also when a sum of finite values overflows."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    verdicts = [
        torch.stack([grad.sum(dtype=_SUM_DTYPE.get(grad.dtype)) for grad in group]).isfinite().all()
        for group in by_device.values()
    ]
    return all(bool(verdict) for verdict in verdicts)


# A 16-bit sum is accumulated and returned in float32: a float16 result would overflow at 65504.
_SUM_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _nonfinite_probe(grads: Sequence[Tensor]) -> Tensor:
    """0 when every gradient is finite, NaN otherwise: the sum of each ``sum(g * 0)``."""
    probes = [torch.sum(grad * 0) for grad in grads]
    total = probes[0]
    for probe in probes[1:]:
        total = total + probe.to(total.device)
    return total


def _finite(value: Tensor) -> Tensor:
    """Whether the 0-d ``value`` is finite, as a 0-d tensor; for a DTensor, over all ranks."""
    return torch.isfinite(value.full_tensor() if hasattr(value, "full_tensor") else value)


def is_finite(value: Tensor) -> bool:
    """Whether the 0-d ``value`` is finite; for a DTensor, its value over all ranks."""
    return bool(_finite(value))
