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

Where NumPy is installed, float32 roots can also come from ``numpy.sqrt``, which is IEEE
(hardware square root instructions, or C's ``sqrtf``) and about three times cheaper on CPU
than a float64 root: :func:`numpy_sqrt` offers it after checking, once per process, that it
gives the float64 route's bits on the values closest to rounding boundaries, special values and
NaNs included. torch stays the only dependency: without NumPy, the float64 route is used.

For float16 and bfloat16 there are only 65,536 inputs, so this module checks torch's own
square root on every one of them, once per process (:func:`native_sqrt_is_exact`), and uses
it directly when it equals the float64 route bit for bit, NaNs included. float64 square
roots are torch's own: there is no wider type to borrow (they are within one ulp). On other
devices torch's square root is already correctly rounded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._copy import copy_into

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


def boundary_cases() -> Tensor:
    """float32 values whose roots lie closest to rounding boundaries, and special values:
    squares of floats and of the midpoints between neighbouring floats (rounded to float32)
    with their neighbours, powers of two, subnormals, zeros, infinities, NaN, negatives."""
    generator = torch.Generator().manual_seed(0)
    count = 1 << 14
    exponents = torch.randint(-75, 64, (count,), generator=generator).double()
    roots = ((torch.rand(count, generator=generator, dtype=torch.float64) + 1.0) * 2.0**exponents).float()
    wide = roots.double()
    ulps = (torch.nextafter(roots, torch.full_like(roots, torch.inf)) - roots).double()
    squares = torch.cat([wide * wide, (wide + ulps / 2) ** 2, (wide - ulps / 2) ** 2]).float()
    powers = 2.0 ** torch.arange(-149, 128, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, torch.inf, -torch.inf, torch.nan, -1.0, 1e-45, 1.1754942e-38, 3.4028235e38])
    payloads = torch.tensor([0x7FC12345, 0x7F800001, -0x003ABCDF, -0x007FFFFF], dtype=torch.int32).view(torch.float32)
    values = torch.cat([squares, powers.float(), special, payloads])  # NaNs with payloads, signalling too
    values = values[torch.isfinite(values) | torch.isnan(values) | torch.isinf(values)]
    up = torch.nextafter(values, torch.full_like(values, torch.inf))
    down = torch.nextafter(values, torch.full_like(values, -torch.inf))
    return torch.cat([values, up, down, -values])


@functools.cache
def numpy_sqrt() -> Callable[[Tensor, Tensor, Tensor], None] | None:
    """``f(tensor, out, wide)``: the correctly rounded float32 square root of ``tensor`` into
    ``out`` (not ``tensor`` itself) by NumPy, where NumPy is installed and gives the float64
    route's bits on :func:`boundary_cases`; else ``None``.

    NumPy's root of a negative number is a NaN with the sign bit set, the float64 route's has
    it clear: when NumPy reports an invalid operation (a negative input), the chunk is redone
    by the float64 route in ``wide`` (a float64 buffer as long as ``tensor``).
    """
    try:
        import numpy
    except ImportError:
        return None
    values = boundary_cases()
    values = values[~(values < 0)]
    expected = torch.sqrt(values.double()).float()
    got = torch.empty_like(values)
    with numpy.errstate(invalid="ignore"):  # signalling NaNs
        numpy.sqrt(values.numpy(), out=got.numpy())
    if not torch.equal(got.view(torch.int32), expected.view(torch.int32)):
        return None
    sqrt: Any = numpy.sqrt
    errstate: Any = numpy.errstate
    try:
        with errstate(invalid="raise"):
            sqrt(torch.tensor([-1.0]).numpy())
        return None  # negative inputs would go unnoticed
    except FloatingPointError:
        pass

    def into(tensor: Tensor, out: Tensor, wide: Tensor) -> None:
        try:
            with errstate(invalid="raise"):
                sqrt(tensor.numpy(), out=out.numpy())
        except FloatingPointError:
            wide.copy_(tensor)
            torch.sqrt(wide, out=wide)
            out.copy_(wide)

    return into


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
