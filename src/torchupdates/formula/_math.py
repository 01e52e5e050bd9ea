"""Elementwise functions that accept a number, a tensor or a :class:`~torchupdates.formula.Symbol`.

Rule formulas call these instead of ``torch.*`` so that one formula serves every engine
and also the scalar coefficients (for example Adam's bias correction) computed from
hyperparameters that may be Python numbers or 0-d tensors.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar, overload

import torch
from torch import Tensor

from ._graph import Symbol
from ._sqrt import sqrt_tensor

Value = Tensor | Symbol
"""What a formula computes on: one tensor, or a symbol standing for many tensors at once."""

Array = Any
"""How formulas annotate a :data:`Value`. Python's typing cannot say "the same kind in and
out" through reflected operators (``0.9 * x``), so formulas are checked by tests instead."""

V = TypeVar("V", Tensor, Symbol)


@overload
def sqrt(x: float) -> float: ...
@overload
def sqrt(x: V) -> V: ...
def sqrt(x: float | V) -> float | V:
    """Square root, elementwise, correctly rounded (see :mod:`torchupdates.formula._sqrt`)."""
    if isinstance(x, Symbol):
        return x.sqrt()
    if isinstance(x, Tensor):
        return sqrt_tensor(x)
    return math.sqrt(x)


def square(x: V) -> V:
    """``x * x``: the correctly rounded square, the same as ``x ** 2`` in IEEE arithmetic."""
    return x * x


def maximum(a: V, b: V) -> V:
    """Elementwise maximum of two values of the same kind."""
    if isinstance(a, Symbol) and isinstance(b, Symbol):
        return a.maximum(b)
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.maximum(a, b)
    raise TypeError(f"maximum needs two tensors or two symbols, got {type(a)} and {type(b)}")
