"""Correctly rounded square roots for low-precision tensors on CPU.

IEEE 754 requires ``sqrt`` to be correctly rounded, and Lasagne's float32 arithmetic was. On
CPU, torch computes float32 square roots with a vector-math library accurate to about one
unit in the last place, not correctly rounded (about one element in five differs from the
IEEE result, by one ulp). A float32, float16 or bfloat16 square root computed in float64 and
rounded once to the narrow dtype is the correctly rounded result, so that is what the rules
use on CPU. float64 square roots are torch's own: there is no wider type to borrow (they are
within one ulp). On other devices torch's square root is already correctly rounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .apply import copy_into

_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _via_float64(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype in _NARROW


def sqrt_tensor(tensor: Tensor) -> Tensor:
    """The correctly rounded square root of a tensor (see the module notes for float64)."""
    if _via_float64(tensor):
        return torch.sqrt(tensor.double()).to(tensor.dtype)
    return torch.sqrt(tensor)


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
