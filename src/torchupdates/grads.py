"""Gradients from a loss or from a list: the first step of every update rule."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor

__all__ = ["get_or_compute_grads"]


def describe(position: int, param: Tensor, group: int | None = None) -> str:
    """How error messages name a parameter: its position, group, shape and dtype."""
    where = f", param group {group}" if group is not None else ""
    return f"parameter {position} ({tuple(param.shape)} {str(param.dtype).replace('torch.', '')}{where})"


def check_leaf(position: int, param: object) -> None:
    """Raise unless ``param`` is a tensor an optimizer can write to: a leaf."""
    if not isinstance(param, Tensor):
        raise TypeError(f"parameter {position} must be a torch.Tensor, got {type(param).__name__}")
    if not param.is_leaf:
        raise ValueError(
            f"{describe(position, param)} is not a leaf tensor: it was computed from other tensors, "
            "so writing to it would not change the model; pass the leaf tensor (e.g. the nn.Parameter)"
        )


def compute_grads(loss: Tensor, params: Sequence[Tensor], names: Sequence[str] | None = None) -> list[Tensor]:
    """Gradients of a scalar ``loss`` with respect to ``params``, with errors that name the problem."""
    names = list(names) if names is not None else [describe(i, p) for i, p in enumerate(params)]
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar tensor, got shape {tuple(loss.shape)}")
    if loss.is_complex():
        raise TypeError("the loss must be real, got a complex tensor")
    for name, param in zip(names, params, strict=True):
        if not param.requires_grad:
            raise ValueError(f"{name} does not require grad, so no gradient can be computed for it")
    if not loss.requires_grad:
        raise ValueError("the loss does not require grad: it does not depend on any parameter")
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            raise ValueError(f"the loss does not depend on {name}")
    return [g for g in grads if g is not None]


def given_grads(
    loss_or_grads: object, count: int, accepted: str = "a scalar loss tensor or a list of gradients"
) -> Tensor | list[Tensor | None]:
    """What a gradient argument gives: a loss (returned as it is) or ``count`` gradients.

    Parameters
    ----------
    loss_or_grads : object
        A loss tensor, or a list or tuple of gradients (``None`` entries kept).
    count : int
        The number of parameters, which a list of gradients must match.
    accepted : str
        What the caller accepts, for the error message.

    Raises
    ------
    ValueError
        When a list has the wrong length.
    TypeError
        When ``loss_or_grads`` is neither a tensor nor a list or tuple.
    """
    if isinstance(loss_or_grads, Tensor):
        return loss_or_grads
    if isinstance(loss_or_grads, (list, tuple)):
        if len(loss_or_grads) != count:
            raise ValueError(f"got {len(loss_or_grads)} gradients for {count} parameters")
        return list(loss_or_grads)
    raise TypeError(f"loss_or_grads must be {accepted}, got {type(loss_or_grads).__name__}")


def get_or_compute_grads(loss_or_grads: Tensor | Sequence[Tensor], params: Iterable[Tensor]) -> list[Tensor]:
    """Return gradients for ``params``: given as a list, or computed from a loss.

    Parameters
    ----------
    loss_or_grads : Tensor or list of Tensor
        A scalar loss tensor, or one gradient per parameter.
    params : iterable of Tensor
        Leaf tensors (typically ``nn.Parameter``) to return gradients for.

    Returns
    -------
    list of Tensor
        The given list unchanged (as a list) when ``loss_or_grads`` is a list or tuple,
        otherwise ``torch.autograd.grad(loss, params)``. ``.grad`` is not touched.

    Raises
    ------
    ValueError
        When the list's length differs from the number of parameters, a parameter is not a
        leaf tensor (it could never be updated), the loss is not a scalar, or the loss does
        not depend on a parameter (the message names it).
    TypeError
        When a parameter is not a tensor or ``loss_or_grads`` is neither a tensor nor a list.

    Examples
    --------
    >>> import torch, torchupdates as updates
    >>> w = torch.ones(3, requires_grad=True)
    >>> updates.get_or_compute_grads((w ** 2).sum(), [w])
    [tensor([2., 2., 2.])]
    """
    params = list(params)
    for position, param in enumerate(params):
        check_leaf(position, param)
    given = given_grads(loss_or_grads, len(params))
    if isinstance(given, Tensor):
        return compute_grads(given, params)
    return cast("list[Tensor]", given)
