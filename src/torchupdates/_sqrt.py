"""Moved to :mod:`torchupdates.formula._sqrt` (this name stays while other modules move over)."""

from .formula._sqrt import (
    boundary_cases,
    native_sqrt_is_exact,
    needs_wide_sqrt,
    numpy_sqrt,
    sqrt_into,
    sqrt_list,
    sqrt_list_,
    sqrt_tensor,
)

__all__ = [
    "boundary_cases",
    "native_sqrt_is_exact",
    "needs_wide_sqrt",
    "numpy_sqrt",
    "sqrt_into",
    "sqrt_list",
    "sqrt_list_",
    "sqrt_tensor",
]
