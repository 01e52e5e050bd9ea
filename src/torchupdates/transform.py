"""What an update rule or a modifier is: its hyperparameters, its state and its formula.

A :class:`Transform` is pure data plus one function. A *rule* maps gradients to proposed
parameter values; a *modifier* maps proposed values to new proposed values (momentum).
The :class:`~torchupdates.Optimizer` chains one rule and any number of modifiers, and an
engine decides how the formulas run (one tensor at a time, or many tensors per kernel).
A formula uses ordinary operators and :func:`sqrt`, :func:`square` and :func:`maximum`
(re-exported here), which work on numbers, tensors and tensor lists alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .formula import Value, maximum, sqrt, square

__all__ = [
    "NON_NEGATIVE",
    "UNIT_INTERVAL",
    "Bound",
    "Formula",
    "Hyperparameter",
    "Transform",
    "check_hyperparameter",
    "check_hyperparameter_device",
    "defaults_of",
    "maximum",
    "sqrt",
    "square",
    "zero_state",
]

Formula = Callable[..., "tuple[Value, dict[str, Value]]"]
"""``formula(param, incoming, state, t, **hyperparameters) -> (proposal, new_state)``.

``incoming`` is the gradient for a rule and the proposal of the previous stage for a
modifier. ``state`` maps the transform's state names to their current values, ``t`` is the
1-based step number (``None`` for transforms that do not count steps).
"""


@dataclass(frozen=True)
class Bound:
    """The allowed range of a hyperparameter: ``low <= x`` and ``x < high`` (or ``<=``)."""

    low: float = 0.0
    high: float = math.inf
    high_inclusive: bool = False

    def contains(self, x: float) -> bool:
        if not self.low <= x:  # also rejects NaN
            return False
        return x <= self.high if self.high_inclusive else x < self.high

    def describe(self) -> str:
        if math.isinf(self.high):
            return f">= {self.low:g}"
        closing = "]" if self.high_inclusive else ")"
        return f"in [{self.low:g}, {self.high:g}{closing}"


NON_NEGATIVE = Bound()
UNIT_INTERVAL = Bound(0.0, 1.0)


@dataclass(frozen=True)
class Hyperparameter:
    """A named hyperparameter with its default (``None``: the caller must give it)."""

    name: str
    default: float | None
    bound: Bound


@dataclass(frozen=True)
class Transform:
    """One rule or modifier.

    Attributes
    ----------
    name : str
        The public name, e.g. ``"adam"`` or ``"apply_momentum"``.
    hyperparameters : tuple of Hyperparameter
        Keyword names of ``formula`` with defaults and allowed ranges.
    state : tuple of str
        Per-parameter state tensors, zero-initialised, shaped like the parameter.
    formula : Formula
        The math, written once for tensors and tensor lists alike.
    counts_steps : bool
        Whether the formula needs the step number ``t`` (bias corrections).
    accepts_sparse : bool
        Whether sparse gradients may be used (they are densified; the math is unchanged).
    per_tensor : bool
        Whether the formula needs whole tensors (a norm over a slice), so that the engines
        cannot run it element by element: the optimizer runs it on each tensor between
        engine runs of the other stages.
    scale : callable, optional
        For a per-tensor formula that multiplies its proposal by a factor computed from it:
        that factor, ``scale(proposal, **hyperparameters)``. With it, a step whose last stage
        this is rescales each parameter in place once the stages before it are written,
        instead of writing a new tensor.
    """

    name: str
    hyperparameters: tuple[Hyperparameter, ...]
    state: tuple[str, ...]
    formula: Formula
    counts_steps: bool = False
    accepts_sparse: bool = False
    per_tensor: bool = False
    scale: Callable[..., Tensor] | None = None


def check_hyperparameter(owner: str, spec: Hyperparameter, value: Any, *, read_tensors: bool = True) -> None:
    """Raise a clear error unless ``value`` is a valid value for ``spec``.

    Valid values are Python ``int`` and ``float`` (NumPy's ``float64`` is a ``float``) and
    real floating-point 0-d tensors inside the hyperparameter's range, a tensor on a device
    that holds values (not ``meta``). Other numbers (``fractions.Fraction``, ``decimal``,
    NumPy's ``float32``) are a ``TypeError``: the kernels could not take them. A tensor is
    read (not copied), so its later in-place changes are seen by the next step. With
    ``read_tensors=False`` a tensor's range is not checked (only its shape, dtype, device and
    ``requires_grad``): reading its value syncs with its device, which a ``torch.compile``
    graph cannot do. Whether a tensor's device suits the parameters is checked per param
    group (:func:`check_hyperparameter_device`).
    """
    where = f"{owner}: {spec.name}"
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{where} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{where} must be a real floating-point tensor, got dtype {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{where} must not require grad")
        if value.layout != torch.strided:
            raise TypeError(f"{where} must be a dense tensor, got layout {value.layout}")
        if value.device.type == "meta":
            raise ValueError(f"{where} is a tensor on the meta device, which holds no value; put it on the CPU")
        if not read_tensors:
            return
        number = float(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{where} must be {spec.bound.describe()}, got {value!r}") from None
    else:
        hint = " (convert it with float())" if isinstance(value, Real) and not isinstance(value, bool) else ""
        raise TypeError(f"{where} must be a Python int or float or a 0-d tensor, got {type(value).__name__}{hint}")
    if not spec.bound.contains(number):
        raise ValueError(f"{where} must be {spec.bound.describe()}, got {number!r}")


def check_hyperparameter_device(owner: str, name: str, value: Any, params: Iterable[Tensor]) -> None:
    """Raise a ``ValueError`` unless a tensor ``value`` can be used with ``params``: a CPU
    tensor goes with parameters anywhere (as torch takes CPU scalars), another device's
    tensor only with parameters on that device."""
    if not isinstance(value, Tensor) or value.device.type == "cpu":
        return
    for position, param in enumerate(params):
        if isinstance(param, Tensor) and param.device != value.device:
            raise ValueError(
                f"{owner}: {name} is a tensor on {value.device}, but parameter {position} of the group is on "
                f"{param.device}; put it on the parameters' device or on the CPU"
            )


def defaults_of(transform: Transform, given: Mapping[str, Any]) -> dict[str, Any]:
    """Merge keyword values given by the caller over the transform's defaults, checked."""
    values: dict[str, Any] = {}
    for spec in transform.hyperparameters:
        value = given.get(spec.name, spec.default)
        if value is None:
            raise TypeError(f"{transform.name}: missing required hyperparameter {spec.name!r}")
        check_hyperparameter(transform.name, spec, value)
        values[spec.name] = value
    unknown = set(given) - {spec.name for spec in transform.hyperparameters}
    if unknown:
        raise TypeError(f"{transform.name}: unknown hyperparameter(s) {sorted(unknown)}")
    return values


def zero_state(param: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A zero tensor shaped and placed like ``param`` (its dtype unless told otherwise)."""
    return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
