"""Modifiers: transforms of proposed parameter values, applicable on top of any rule."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .formula import Array, Scalar
from .optimizer import Optimizer
from .transform import UNIT_INTERVAL, Hyperparameter, Transform

__all__ = ["apply_momentum", "apply_nesterov_momentum"]


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

    Returns
    -------
    Optimizer
        A new optimizer that takes over the wrapped one's param groups and state; step the
        new one only. State per parameter: ``velocity`` (zero at the start).

    Raises
    ------
    TypeError
        When ``optimizer`` is not a torchupdates :class:`Optimizer`.
    ValueError
        When ``params`` holds a tensor the optimizer does not optimize, or ``momentum`` is
        out of range.

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

    Returns
    -------
    Optimizer
        A new optimizer that takes over the wrapped one's param groups and state; step the
        new one only. State per parameter: ``velocity``.

    Raises
    ------
    TypeError
        When ``optimizer`` is not a torchupdates :class:`Optimizer`.
    ValueError
        When ``params`` holds a tensor the optimizer does not optimize, or ``momentum`` is
        out of range.

    References
    ----------
    .. [1] Bengio, Y., Boulanger-Lewandowski, N. and Pascanu, R. (2013): Advances in
       optimizing recurrent networks. ICASSP 2013, arXiv:1212.0901.
    """
    return _compose(optimizer, NESTEROV_MOMENTUM, params, momentum)


def _compose(optimizer: Optimizer, modifier: Transform, params: Iterable[Tensor] | None, momentum: Scalar) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"{modifier.name} wraps a torchupdates Optimizer (from sgd, adam, ...), got {type(optimizer).__name__}"
        )
    return optimizer.compose(modifier, params, momentum=momentum)
