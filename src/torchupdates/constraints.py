"""Norm constraints: pure functions that rescale tensors (weights, updates or gradients)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from ._docs import filled
from ._host_sums import host_sum_of_squares
from .formula import Scalar
from .transform import NON_NEGATIVE, Hyperparameter, check_hyperparameter

__all__ = ["check_norm_axes", "norm_constraint", "total_norm_constraint"]

DEFAULT_EPSILON = 1e-7
"""The default epsilon of both constraints (added to the norm in the denominator)."""

_MAX_NORM = Hyperparameter("max_norm", None, NON_NEGATIVE)
_EPSILON = Hyperparameter("epsilon", None, NON_NEGATIVE)


def _sum_of_squares(tensor: Tensor, dim: tuple[int, ...] | None = None) -> Tensor:
    square = torch.real(tensor * tensor.conj()) if tensor.is_complex() else tensor * tensor
    if dim is None:
        return torch.sum(square)
    return torch.sum(square, dim=dim, keepdim=True)


def _largest_magnitude(tensor: Tensor, dim: tuple[int, ...] | None = None) -> Tensor:
    magnitude = tensor.abs()
    if dim is None:
        return torch.amax(magnitude) if magnitude.numel() else magnitude.new_zeros(())
    return torch.amax(magnitude, dim=dim, keepdim=True)


def _without_overflow(
    norm: Tensor, largest: Callable[[], Tensor], scaled_sum_of_squares: Callable[[Tensor], Tensor]
) -> Tensor:
    """``norm`` where it is finite; where squaring overflowed (finite inputs, infinite sum),
    ``scale * sqrt(sum((x / scale)**2))`` with ``scale = largest()``, the largest magnitude,
    instead. The seed's formula stands wherever nothing overflows, bit for bit. Dividing by
    the largest magnitude first keeps every square at most 1, so a float16 row of norm 300, or
    float32 elements near 1e20, get their true norm instead of infinity (which would turn the
    rescaled tensor into zeros). The second pass runs only when some norm is infinite (one
    look at the norms on the host; traced by ``torch.compile``, always).
    """
    if not torch.compiler.is_compiling() and not bool(torch.isinf(norm).any()):
        return norm
    scale = largest()
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rescued = safe_scale * torch.sqrt(scaled_sum_of_squares(safe_scale))
    return torch.where(torch.isinf(norm) & torch.isfinite(scale), rescued, norm)


def _clip(norm: Tensor, max_norm: Scalar) -> Tensor:
    """``clip(norm, 0, max_norm)``."""
    low = torch.clamp(norm, min=0.0)
    if isinstance(max_norm, Tensor):
        return torch.minimum(low, max_norm.to(low.dtype))
    return torch.clamp(low, max=max_norm)


def _check_tensor(name: str, tensor: object) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"{name} must be floating point or complex, got dtype {tensor.dtype}")
    return tensor


def check_norm_axes(ndim: int, norm_axes: Sequence[int] | int | None) -> tuple[int, ...]:
    """The axes of the norm of an ``ndim``-d tensor, each in ``range(ndim)``: ``norm_axes``
    checked, or the default (every axis but 0, for 2 to 5 dimensions). ``ValueError``
    otherwise."""
    if norm_axes is None:
        if 2 <= ndim <= 5:
            return tuple(range(1, ndim))
        raise ValueError(f"Unsupported tensor dimensionality {ndim}. Must specify `norm_axes`")
    if isinstance(norm_axes, int):
        norm_axes = (norm_axes,)
    axes = []
    for axis in norm_axes:
        if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
            raise ValueError(f"norm_axes entry {axis!r} is not an axis of a {ndim}-d tensor")
        axes.append(axis % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"norm_axes {tuple(norm_axes)} repeats an axis")
    return tuple(axes)


@filled
def norm_constraint(
    tensor: Tensor, max_norm: Scalar, norm_axes: Sequence[int] | None = None, epsilon: Scalar = DEFAULT_EPSILON
) -> Tensor:
    r"""Rescale the slices of a tensor whose norm exceeds ``max_norm`` (max-norm constraint).

    With :math:`n` the Euclidean norm over ``norm_axes`` (kept as size-1 axes):

    .. math::
        n &= \sqrt{\textstyle\sum_{\text{axes}} x^2} \\
        x &\leftarrow x \cdot \frac{\operatorname{clip}(n, 0, \text{max\_norm})}{\epsilon + n}

    Slices within the bound are left (almost) unchanged: they are multiplied by
    :math:`n / (\epsilon + n)`. Use it on weights (instead of weight decay), on proposed
    updates (``upd[W] = norm_constraint(upd[W], 3.0)``) or on gradients (clipping).

    Parameters
    ----------
    tensor : Tensor
        A floating-point (or complex) tensor. It is not modified.
    max_norm : float or 0-d Tensor
        The largest allowed norm, >= 0.
    norm_axes : sequence of int, optional
        Axes to compute the norm over. Default, for 2-D to 5-D tensors: every axis but 0,
        which is one norm per output unit of ``nn.Linear`` weights ``(out, in)`` and per
        output channel of ``nn.Conv*d`` weights ``(out, in, *kernel)``. Lasagne's dense
        layers stored ``(in, out)``: pass ``norm_axes=(0,)`` to reproduce its 2-D default.
    epsilon : float or 0-d Tensor, optional
        Added to the norm in the denominator against division by zero. Default 1e-7.

    Returns
    -------
    Tensor
        A new tensor of the same shape and dtype. Differentiable.

    Raises
    ------
    ValueError
        For tensors of other than 2 to 5 dimensions when ``norm_axes`` is not given
        ("Unsupported tensor dimensionality ..."), for bad axes, and for negative
        ``max_norm`` or ``epsilon``.

    {max_norm_references}

    Examples
    --------
    >>> import torch, torchupdates as updates
    >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> updates.norm_constraint(w, 1.0, epsilon=0.0)
    tensor([[0.6000, 0.8000],
            [0.3000, 0.4000]])
    """
    return tensor * norm_constraint_scale(tensor, max_norm, norm_axes, epsilon)


def norm_constraint_scale(
    tensor: Tensor, max_norm: Scalar, norm_axes: Sequence[int] | None = None, epsilon: Scalar = DEFAULT_EPSILON
) -> Tensor:
    """The factor :func:`norm_constraint` multiplies ``tensor`` by: ``clip(n, 0, max_norm) /
    (epsilon + n)`` per slice, with size-1 axes where the norm's axes were. Multiplying a
    tensor in place by it gives the same bits as ``norm_constraint`` without a new tensor."""
    tensor = _check_tensor("tensor", tensor)
    check_hyperparameter("norm_constraint", _MAX_NORM, max_norm)
    check_hyperparameter("norm_constraint", _EPSILON, epsilon)
    axes = check_norm_axes(tensor.dim(), norm_axes)
    norms = torch.sqrt(_sum_of_squares(tensor, axes))
    norms = _without_overflow(
        norms, lambda: _largest_magnitude(tensor, axes), lambda scale: _sum_of_squares(tensor / scale, axes)
    )
    return _clip(norms, max_norm) / (epsilon + norms)


def _total(parts: Iterable[Tensor]) -> Tensor:
    """The sum of 0-d tensors, in order."""
    iterator = iter(parts)
    total = next(iterator)
    for part in iterator:
        total = total + part
    return total


@overload
def total_norm_constraint(
    tensors: Iterable[Tensor], max_norm: Scalar, epsilon: Scalar = ..., return_norm: Literal[False] = ...
) -> list[Tensor]: ...
@overload
def total_norm_constraint(
    tensors: Iterable[Tensor], max_norm: Scalar, epsilon: Scalar = ..., *, return_norm: Literal[True]
) -> tuple[list[Tensor], Tensor]: ...
@overload
def total_norm_constraint(
    tensors: Iterable[Tensor], max_norm: Scalar, epsilon: Scalar, return_norm: Literal[True]
) -> tuple[list[Tensor], Tensor]: ...
def total_norm_constraint(
    tensors: Iterable[Tensor], max_norm: Scalar, epsilon: Scalar = DEFAULT_EPSILON, return_norm: bool = False
) -> list[Tensor] | tuple[list[Tensor], Tensor]:
    r"""Rescale a list of tensors together so that their joint norm is at most ``max_norm``.

    .. math::
        n &= \sqrt{\textstyle\sum_i \sum x_i^2} \\
        x_i &\leftarrow x_i \cdot \frac{\operatorname{clip}(n, 0, \text{max\_norm})}{\epsilon + n}

    The usual gradient clipping of recurrent networks [1]_:
    ``grads = total_norm_constraint(grads, 5.0)`` then ``opt.step(grads)``.

    Parameters
    ----------
    tensors : iterable of Tensor
        Floating-point (or complex) tensors, e.g. gradients. They are not modified.
    max_norm : float or 0-d Tensor
        The largest allowed joint norm, >= 0.
    epsilon : float or 0-d Tensor, optional
        Added to the norm in the denominator against division by zero. Default 1e-7.
    return_norm : bool, optional
        Also return :math:`n`, the joint norm before rescaling (useful to monitor
        training). Default False.

    Returns
    -------
    list of Tensor
        The rescaled tensors, new, in the given order.
    Tensor
        The joint norm (0-d), only when ``return_norm`` is true.

    Raises
    ------
    ValueError
        For an empty list, or a negative ``max_norm`` or ``epsilon``.
    TypeError
        For an entry that is not a floating-point or complex tensor.

    References
    ----------
    .. [1] Sutskever, I., Vinyals, O. and Le, Q. V. (2014): Sequence to sequence learning
       with neural networks. NeurIPS 27, 3104-3112.

    Examples
    --------
    >>> import torch, torchupdates as updates
    >>> clipped, norm = updates.total_norm_constraint(
    ...     [torch.tensor([3.0]), torch.tensor([4.0])], 1.0, epsilon=0.0, return_norm=True)
    >>> clipped, norm
    ([tensor([0.6000]), tensor([0.8000])], tensor(5.))
    """
    tensors = [_check_tensor(f"tensors[{i}]", t) for i, t in enumerate(tensors)]
    if not tensors:
        raise ValueError("total_norm_constraint needs at least one tensor")
    check_hyperparameter("total_norm_constraint", _MAX_NORM, max_norm)
    check_hyperparameter("total_norm_constraint", _EPSILON, epsilon)
    norm = joint_norm(tensors)
    multiplier = clip_factor(norm, max_norm, epsilon)
    scaled = [tensor * multiplier for tensor in tensors]
    return (scaled, norm) if return_norm else scaled


def joint_norm(tensors: Sequence[Tensor]) -> Tensor:
    """:func:`total_norm_constraint`'s :math:`n` of checked, non-empty ``tensors``."""
    total = host_sum_of_squares(tensors, _sum_of_squares)
    if total is None:
        total = _total(_sum_of_squares(t) for t in tensors)
    norm = torch.sqrt(total)

    def largest() -> Tensor:
        magnitude = _largest_magnitude(tensors[0])
        for tensor in tensors[1:]:
            magnitude = torch.maximum(magnitude, _largest_magnitude(tensor))
        return magnitude

    return _without_overflow(norm, largest, lambda scale: _total(_sum_of_squares(t / scale) for t in tensors))


def clip_factor(norm: Tensor, max_norm: Scalar, epsilon: Scalar = DEFAULT_EPSILON) -> Tensor:
    """:func:`total_norm_constraint`'s multiplier: ``clip(norm, 0, max_norm) / (epsilon + norm)``."""
    return _clip(norm, max_norm) / (epsilon + norm)
