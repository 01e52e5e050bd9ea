"""Correctly rounded square roots for low-precision tensors on CPU.

IEEE 754 requires ``sqrt`` to be correctly rounded, and Lasagne's float32 arithmetic was. On
CPU, torch computes float32 square roots with a vector-math library accurate to about one
unit in the last place, not correctly rounded (about one element in ten differs from the
IEEE result, by one ulp). A float32, float16 or bfloat16 square root computed in float64 and
rounded once to the narrow dtype is the correctly rounded result, so that is what the rules
use on CPU.

Why that is exact: let ``x`` be a positive float32 and ``y = sqrt(x)`` exactly, with
``2**(e-1) <= y < 2**e``. A float32 rounding boundary near ``y`` is a midpoint
``m = (2k+1) * 2**(e-25)``, so ``m*m`` is an odd multiple of ``2**(2e-50)``, while ``x`` is a
multiple of ``2**(2e-25)`` or of a larger power of two (24 significant bits; subnormals have
an even coarser quantum relative to ``2**(2e-50)``): so ``x != m*m`` and
``|x - m*m| >= 2**(2e-50)``. Then ``|y - m| = |x - m*m| / (y + m) >= 2**(e-51)``: four float64
ulps of ``y`` (``2**(e-53)`` each). A float64 square root within one ulp (torch's) therefore
lies strictly on the same side of every float32 boundary as ``y``, and rounding it to float32
gives the float32 nearest to ``y``. 0, -0, +inf, NaN and negative inputs give the same special
values either way; float16 and bfloat16 have fewer bits, hence wider gaps. ``tests/test_sqrt.py``
checks all of it against NumPy's IEEE square root (every float32 with
``TORCHUPDATES_EXHAUSTIVE=1``).

For float16 and bfloat16 there are only 65,536 inputs, so this module checks torch's own
square root on every one of them, once per process (:func:`native_sqrt_is_exact`), and uses
it directly when it equals the float64 route bit for bit, NaNs included. float64 square
roots are torch's own: there is no wider type to borrow (they are within one ulp). On other
devices torch's square root is already correctly rounded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .apply import copy_into

_NARROW = (torch.float32, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def native_sqrt_is_exact(dtype: torch.dtype) -> bool:
    """Whether torch's own CPU square root of ``dtype`` is used as is: for the 16-bit types,
    when it equals the float64 route on every value, NaNs included; never for float32 (too
    many values to check); always for float64 (there is nothing wider)."""
    if dtype == torch.float64:
        return True
    if dtype not in _HALF:
        return False
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    native = torch.sqrt(every)
    wide = torch.sqrt(every.double()).to(dtype)
    return bool(torch.equal(native.view(torch.int16), wide.view(torch.int16)))


def needs_wide_sqrt(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether square roots of ``dtype`` on ``device`` go through float64 to be exact."""
    return device.type == "cpu" and dtype in _NARROW and not native_sqrt_is_exact(dtype)


def _via_float64(tensor: Tensor) -> bool:
    return needs_wide_sqrt(tensor.dtype, tensor.device)


def sqrt_tensor(tensor: Tensor) -> Tensor:
    """The correctly rounded square root of a tensor (see the module notes for float64)."""
    if _via_float64(tensor):
        return torch.sqrt(tensor.double()).to(tensor.dtype)
    return torch.sqrt(tensor)


def sqrt_into(tensor: Tensor, out: Tensor, wide: Tensor | None = None) -> None:
    """``out`` becomes the correctly rounded square root of ``tensor`` (same length; ``out``
    may be ``tensor``). ``wide``: a float64 buffer of that length to use when the root goes
    through float64 (one is allocated when it does and none is given)."""
    if not _via_float64(tensor):
        torch.sqrt(tensor, out=out)
        return
    if wide is None:
        wide = torch.empty(tensor.shape, dtype=torch.float64, device=tensor.device)
    wide.copy_(tensor)
    torch.sqrt(wide, out=wide)
    out.copy_(wide)


def _roots_in_float64(tensors: Sequence[Tensor]) -> list[Tensor]:
    wide = [t.double() for t in tensors]
    torch._foreach_sqrt_(wide)
    return wide


def sqrt_list(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`sqrt_tensor` of every tensor of a list (of one device and dtype), foreach."""
    if not tensors or not _via_float64(tensors[0]):
        return list(torch._foreach_sqrt(list(tensors)))
    return [root.to(t.dtype) for root, t in zip(_roots_in_float64(tensors), tensors, strict=True)]


def sqrt_list_(tensors: Sequence[Tensor]) -> None:
    """In place: each tensor becomes its :func:`sqrt_tensor`."""
    if not tensors or not _via_float64(tensors[0]):
        torch._foreach_sqrt_(list(tensors))
        return
    copy_into(list(tensors), _roots_in_float64(tensors))
