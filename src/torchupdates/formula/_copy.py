"""Copying lists of tensors into others: one foreach copy where torch allows it."""

from __future__ import annotations

import torch
from torch import Tensor

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def copy_into(targets: list[Tensor], values: list[Tensor]) -> None:
    """``target.copy_(value)`` for each pair: one foreach copy for plain tensors of one kind,
    one by one for tensor subclasses (DTensor under FSDP2 has no foreach copy) and under
    ``torch.compile``, whose Inductor (torch 2.13, CPU) miscompiles a foreach copy whose
    values share a computation: ``_foreach_copy_([v, w], [x, maximum(w, x)])`` with
    ``x = 0.9 * v + g`` writes ``v`` and then recomputes ``x`` from the new ``v``."""
    if all(type(target) in _PLAIN_TENSORS for target in targets) and not torch.compiler.is_compiling():
        torch._foreach_copy_(targets, values)
        return
    for target, value in zip(targets, values, strict=True):
        target.copy_(value)
