"""Modifiers: transforms of proposed parameter values, applicable on top of any rule."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import cast

from torch import Tensor

from ._docs import filled
from .constraints import check_norm_axes, norm_constraint, norm_constraint_scale
from .formula import Array, Scalar
from .optimizer import Optimizer
from .transform import NON_NEGATIVE, UNIT_INTERVAL, Formula, Hyperparameter, Transform

__all__ = ["apply_momentum", "apply_nesterov_momentum", "apply_norm_constraint"]


def _momentum(
    param: Array, proposal: Array, state: dict[str, Array], t: None, *, momentum: Scalar
) -> tuple[Array, dict[str, Array]]:
    x = momentum * state["velocity"] + proposal
    return x, {"velocity": x - param}


def _nesterov_momentum(
    param: Array, proposal: Array, state: dict[str, Array], t: None, *, momentum: Scalar
) -> tuple[Array, dict[str, Array]]:
    x = momentum * state["velocity"] + proposal - param
    return momentum * x + proposal, {"velocity": x}


_MOMENTUM_HYPERPARAMETERS = (Hyperparameter("momentum", 0.9, UNIT_INTERVAL),)
MOMENTUM = Transform("apply_momentum", _MOMENTUM_HYPERPARAMETERS, ("velocity",), _momentum)
NESTEROV_MOMENTUM = Transform("apply_nesterov_momentum", _MOMENTUM_HYPERPARAMETERS, ("velocity",), _nesterov_momentum)


@filled
def apply_momentum(optimizer: Optimizer, params: Iterable[Tensor] | None = None, momentum: Scalar = 0.9) -> Optimizer:
    r"""Add (heavy-ball) momentum to any update rule.

    With :math:`u` the value the wrapped optimizer proposes for parameter :math:`p`:

    .. math::
        x &= \mu v + u \\
        v &\leftarrow x - p \\
        p &\leftarrow x

    Parameters
    ----------
    optimizer : Optimizer
        Any torchupdates optimizer (a rule, or a rule already modified).
    params : iterable of Tensor, optional
        The parameters to apply momentum to; the others keep the wrapped rule's proposal.
        Default: all of the optimizer's parameters.
    momentum : float or 0-d Tensor, optional
        :math:`\mu` in [0, 1). Higher momentum smooths over more steps and also makes the
        steps larger; scaling the learning rate by ``1 - momentum`` compensates.
        Default 0.9. Stored in every param group under ``"momentum"`` (``"momentum_2"``
        and so on when that key is already taken).

    {momentum_modifier_result}

    References
    ----------
    .. [1] Polyak, B. T. (1964): Some methods of speeding up the convergence of iteration
       methods. USSR Computational Mathematics and Mathematical Physics, 4(5):1-17.

    Examples
    --------
    >>> import torch, torchupdates as updates
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> opt = updates.apply_momentum(updates.rmsprop([w], learning_rate=1e-3), momentum=0.9)
    >>> opt.rule_name
    'apply_momentum(rmsprop)'
    """
    return _compose(optimizer, MOMENTUM, params, momentum)


@filled
def apply_nesterov_momentum(
    optimizer: Optimizer, params: Iterable[Tensor] | None = None, momentum: Scalar = 0.9
) -> Optimizer:
    r"""Add Nesterov momentum to any update rule.

    With :math:`u` the value the wrapped optimizer proposes for parameter :math:`p`:

    .. math::
        x &= \mu v + u - p \\
        v &\leftarrow x \\
        p &\leftarrow \mu x + u

    This is the formulation that evaluates the gradient at the current parameters
    instead of the look-ahead point [1]_.

    Parameters
    ----------
    optimizer : Optimizer
        Any torchupdates optimizer.
    params : iterable of Tensor, optional
        The parameters to apply momentum to. Default: all of the optimizer's parameters.
    momentum : float or 0-d Tensor, optional
        :math:`\mu` in [0, 1). Default 0.9. Stored in every param group under
        ``"momentum"`` (or the next free ``"momentum_N"``).

    {momentum_modifier_result}

    References
    ----------
    .. [1] Bengio, Y., Boulanger-Lewandowski, N. and Pascanu, R. (2013): Advances in
       optimizing recurrent networks. ICASSP 2013, arXiv:1212.0901.
    """
    return _compose(optimizer, NESTEROV_MOMENTUM, params, momentum)


def _constrain(
    param: Tensor,
    proposal: Tensor,
    state: dict[str, Tensor],
    t: None,
    *,
    max_norm: Scalar,
    epsilon: Scalar,
    norm_axes: tuple[int, ...] | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    return norm_constraint(proposal, max_norm, norm_axes, epsilon), {}


def _constraint_scale(
    proposal: Tensor, *, max_norm: Scalar, epsilon: Scalar, norm_axes: tuple[int, ...] | None
) -> Tensor:
    return norm_constraint_scale(proposal, max_norm, norm_axes, epsilon)


_NORM_CONSTRAINT_HYPERPARAMETERS = (
    Hyperparameter("max_norm", None, NON_NEGATIVE),
    Hyperparameter("epsilon", 1e-7, NON_NEGATIVE),
)


@filled
def apply_norm_constraint(
    optimizer: Optimizer,
    max_norm: Scalar,
    params: Iterable[Tensor] | None = None,
    norm_axes: Sequence[int] | int | None = None,
    epsilon: Scalar = 1e-7,
) -> Optimizer:
    r"""Bound the norm of each parameter's slices after every step (max-norm constraint).

    The final proposal :math:`u` of each selected parameter (what the wrapped optimizer
    would write) goes through :func:`norm_constraint`: with :math:`n` the Euclidean norm of
    :math:`u` over ``norm_axes`` (kept as size-1 axes),

    .. math::
        p \leftarrow u \cdot \frac{\operatorname{clip}(n, 0, \text{max\_norm})}{\epsilon + n}

    It is the update-dictionary edit ``upd[W] = norm_constraint(upd[W], max_norm)`` done
    inside :meth:`~Optimizer.step`, for training loops that only call ``step()``; bit for
    bit the same as editing the dictionary of :meth:`~Optimizer.updates` and writing it with
    :func:`apply_updates`. Modifiers wrapped around this one (momentum, say) see the
    constrained proposal. State of the wrapped rule is not rescaled.

    Parameters
    ----------
    optimizer : Optimizer
        Any torchupdates optimizer (a rule, or a rule already modified).
    max_norm : float or 0-d Tensor
        The largest allowed norm of a slice, >= 0. Stored in every param group under
        ``"max_norm"`` (``"max_norm_2"`` and so on when taken).
    params : iterable of Tensor, optional
        The parameters to constrain; the others keep the wrapped optimizer's proposal.
        Default: all of the optimizer's parameters (each then needs 2 to 5 dimensions, or
        ``norm_axes``).
    norm_axes : sequence of int, optional
        Axes of the norm, as for :func:`norm_constraint`. Default, for 2-D to 5-D
        tensors: every axis but 0 (one norm per output unit of ``nn.Linear`` and
        ``nn.Conv*d`` weights). ``(0,)`` is Lasagne's layout of dense weights.
    epsilon : float or 0-d Tensor, optional
        Added to the norm in the denominator. Default 1e-7. Stored under ``"epsilon"``,
        or the next free ``"epsilon_N"`` when the rule has its own epsilon.

    Returns
    -------
    Optimizer
        A new optimizer that takes over the wrapped one's param groups and state; step the
        new one only. No state of its own.

    Raises
    ------
    TypeError
        When ``optimizer`` is not a torchupdates :class:`Optimizer`.
    ValueError
        When ``params`` holds a tensor the optimizer does not optimize, a selected parameter
        has no valid ``norm_axes`` ("Unsupported tensor dimensionality ..." for the default),
        or ``max_norm`` or ``epsilon`` is negative.

    Notes
    -----
    A norm is a reduction over whole slices, so no engine fuses it with the elementwise
    formulas: a step runs the stages before it without writing, rescales the proposals,
    then runs the stages after it, and writes everything at the end.

    {max_norm_references}

    Examples
    --------
    >>> import torch, torchupdates as updates
    >>> layer = torch.nn.Linear(4, 3)
    >>> opt = updates.apply_norm_constraint(updates.adam(layer.parameters()), 3.0, params=[layer.weight])
    >>> opt.rule_name
    'apply_norm_constraint(adam, 1 params)'
    """
    _check_optimizer(optimizer, "apply_norm_constraint")
    axes = None if norm_axes is None else ((norm_axes,) if isinstance(norm_axes, int) else tuple(norm_axes))
    chosen = None if params is None else list(params)
    flat = [param for group in optimizer.param_groups for param in group["params"]]
    for param in flat if chosen is None else chosen:
        check_norm_axes(param.dim(), axes)
    formula = cast(Formula, functools.partial(_constrain, norm_axes=axes))
    scale = functools.partial(_constraint_scale, norm_axes=axes)
    modifier = Transform(
        "apply_norm_constraint", _NORM_CONSTRAINT_HYPERPARAMETERS, (), formula, per_tensor=True, scale=scale
    )
    return optimizer.compose(modifier, chosen, max_norm=max_norm, epsilon=epsilon)


def _check_optimizer(optimizer: object, name: str) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{name} wraps a torchupdates Optimizer (from sgd, adam, ...), got {type(optimizer).__name__}")


def _compose(optimizer: Optimizer, modifier: Transform, params: Iterable[Tensor] | None, momentum: Scalar) -> Optimizer:
    _check_optimizer(optimizer, modifier.name)
    return optimizer.compose(modifier, params, momentum=momentum)
