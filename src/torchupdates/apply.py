"""Writing an update dictionary: the one place where parameters and state change."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping

import torch
from torch import Tensor

from .formula._copy import copy_into

__all__ = ["apply_updates"]


def apply_updates(updates: Mapping[Tensor, Tensor]) -> None:
    """Write every proposed value of an update dictionary into its tensor, in place.

    Parameters
    ----------
    updates : mapping of Tensor to Tensor
        Target tensor (a parameter or a state tensor) to its new value, as returned by
        :meth:`Optimizer.updates` and possibly edited, e.g. with :func:`norm_constraint`.

    Raises
    ------
    TypeError
        When a key or value is not a tensor, or a value's dtype cannot be cast to its
        target's without losing its kind (complex to real, floating point to integer:
        ``torch.can_cast``).
    ValueError
        When a value's shape differs from its target's, or a value or target holds no
        dense values (a sparse layout, the meta device).

    Notes
    -----
    Every pair is checked before anything is written, so a bad entry leaves all targets
    as they were. Values are cast to the target's dtype and device, as ``copy_`` does.
    ``optimizer.step(x)`` is exactly ``apply_updates(optimizer.updates(x))``.
    """
    for target, value in updates.items():
        check_pair(target, value)
    write_updates(updates)


def write_updates(updates: Mapping[Tensor, Tensor]) -> None:
    """The writing half of :func:`apply_updates`, for pairs known to be valid (an engine's
    proposals): every value read before any target is written."""
    targets_by_id = {id(target) for target in updates}
    batches: dict[Hashable, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for target, value in updates.items():
        if id(value) in targets_by_id and value is not target:
            # All updates take effect at once: read a value before any target is overwritten.
            value = value.clone()
        targets, values = batches[(target.device, target.dtype, value.device, value.dtype, type(target))]
        targets.append(target)
        values.append(value)
    with torch.no_grad():
        for targets, values in batches.values():
            copy_into(targets, values)


def check_pair(target: object, value: object) -> None:
    """Raise unless ``value`` can be written into ``target`` by ``copy_`` as it is meant."""
    if not isinstance(target, Tensor) or not isinstance(value, Tensor):
        raise TypeError(
            f"update dictionaries map tensors to tensors, got {type(target).__name__} -> {type(value).__name__}"
        )
    where = f"tensor of shape {tuple(target.shape)} and dtype {target.dtype}"
    if value.shape != target.shape:
        raise ValueError(
            f"an update of shape {tuple(value.shape)} cannot be written to a tensor of shape {tuple(target.shape)}"
        )
    if target.layout != torch.strided or value.layout != torch.strided:
        raise ValueError(f"an update of layout {value.layout} cannot be written to a {target.layout} {where}")
    if value.device.type == "meta" and target.device.type != "meta":
        raise ValueError(f"an update on the meta device holds no values to write to a {where} on {target.device}")
    if not torch.can_cast(value.dtype, target.dtype):
        raise TypeError(f"an update of dtype {value.dtype} cannot be cast to a {where} without losing its kind")
