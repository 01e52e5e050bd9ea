"""Moved to :mod:`torchupdates.formula`; this module stays while the foreach engine moves over
from :class:`~torchupdates._tensorlist.TensorList` to :class:`~torchupdates.formula.Symbol`."""

from torch import Tensor

from ._tensorlist import TensorList
from .formula import Array, Symbol, maximum, sqrt, square

Value = Tensor | Symbol | TensorList
"""What a formula computes on: one tensor, or a handle standing for many tensors at once."""

__all__ = ["Array", "Value", "maximum", "sqrt", "square"]
