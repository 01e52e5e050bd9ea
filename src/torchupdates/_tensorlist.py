"""A list of tensors that does arithmetic with ``torch._foreach_*`` kernels.

Rule formulas are written once with ordinary operators (``rho * acc + (1 - rho) * g2``).
Given plain tensors they run one parameter at a time; given :class:`TensorList` operands
the same expression runs over many parameters per kernel launch. Every operator maps to
exactly one elementwise IEEE operation per element, in the order written, so both ways of
running a formula give bitwise identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import TypeGuard

import torch
from torch import Tensor

Scalar = float | int | Tensor
"""A hyperparameter or coefficient: a Python number or a 0-d tensor."""


def _is_scalar(value: object) -> TypeGuard[float | Tensor]:
    if isinstance(value, Tensor):
        return value.dim() == 0
    return isinstance(value, Real) and not isinstance(value, bool)


class TensorList:
    """Tensors of one device and dtype, combined elementwise by foreach kernels."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"TensorList({len(self.tensors)} tensors)"

    def __add__(self, other: object) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.tensors, other.tensors))
        if _is_scalar(other):
            return TensorList(torch._foreach_add(self.tensors, other))
        return NotImplemented

    __radd__ = __add__  # IEEE addition is commutative

    def __sub__(self, other: object) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_sub(self.tensors, other.tensors))
        if isinstance(other, Tensor) and other.dim() == 0:
            # No Tensor overload of _foreach_sub; x - s and x + (-s) are the same IEEE result.
            return TensorList(torch._foreach_add(self.tensors, -other))
        if _is_scalar(other) and not isinstance(other, Tensor):
            return TensorList(torch._foreach_sub(self.tensors, other))
        return NotImplemented

    def __rsub__(self, other: object) -> TensorList:
        if _is_scalar(other):
            # s - x is defined by IEEE as s + (-x); negation is exact.
            return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), other))
        return NotImplemented

    def __mul__(self, other: object) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_mul(self.tensors, other.tensors))
        if _is_scalar(other):
            return TensorList(torch._foreach_mul(self.tensors, other))
        return NotImplemented

    __rmul__ = __mul__  # IEEE multiplication is commutative

    def __truediv__(self, other: object) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_div(self.tensors, other.tensors))
        if _is_scalar(other):
            return TensorList(torch._foreach_div(self.tensors, other))
        return NotImplemented

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def __abs__(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def maximum(self, other: TensorList) -> TensorList:
        return TensorList(torch._foreach_maximum(self.tensors, other.tensors))
