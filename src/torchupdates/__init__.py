"""Lasagne's update rules for PyTorch: exact, composable, ``torch.optim`` compatible.

Build an optimizer once from the parameters, then step it::

    import torchupdates as updates
    opt = updates.apply_nesterov_momentum(updates.rmsprop(model.parameters(), 1e-3))
    opt.step(loss)            # or opt.step() after loss.backward()

``opt.updates(loss)`` returns the update dictionary (nothing written), which can be edited
(e.g. with :func:`norm_constraint`) and written with :func:`apply_updates`.
"""

from .apply import apply_updates
from .constraints import norm_constraint, total_norm_constraint
from .grads import get_or_compute_grads
from .modifiers import apply_momentum, apply_nesterov_momentum, apply_norm_constraint
from .optimizer import Optimizer
from .rules import adadelta, adagrad, adam, adamax, amsgrad, momentum, nesterov_momentum, rmsprop, sgd

__version__ = "0.1.0"

__all__ = [
    "Optimizer",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "amsgrad",
    "apply_momentum",
    "apply_nesterov_momentum",
    "apply_norm_constraint",
    "apply_updates",
    "get_or_compute_grads",
    "momentum",
    "nesterov_momentum",
    "norm_constraint",
    "rmsprop",
    "sgd",
    "total_norm_constraint",
]
