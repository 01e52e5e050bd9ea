"""Training one rule on a dataset: the model, the training loop and its record, for ``compare``."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..apply import apply_updates
from ..constraints import norm_constraint, total_norm_constraint
from ..grads import get_or_compute_grads
from ..modifiers import apply_norm_constraint
from ..optimizer import Optimizer
from ._datasets import Dataset
from ._rulespec import RuleSpec

__all__ = ["RunResult", "TrainConfig", "build_mlp", "evaluate", "train_rule", "training_step"]


@dataclass(frozen=True)
class TrainConfig:
    """How every rule is trained.

    Attributes
    ----------
    epochs : int
        Passes over the training set.
    batch_size : int
        Examples per step (the last batch of an epoch may be smaller).
    seed : int
        Seeds the order of the examples in each epoch (the same for every rule).
    engine : str
        The torchupdates engine the rules run on.
    max_norm : float or None
        If given, every weight matrix's proposed value is passed through
        ``norm_constraint(..., max_norm)`` (per output unit).
    clip : float or None
        If given, the gradients are rescaled with ``total_norm_constraint(..., clip)``
        before the step.
    via_dictionary : bool
        Apply ``max_norm`` and ``clip`` by editing the update dictionary (Lasagne's way)
        instead of inside ``step()`` (``apply_norm_constraint`` and ``max_grad_norm``);
        both give the same numbers.
    """

    epochs: int
    batch_size: int
    seed: int
    engine: str = "foreach"
    max_norm: float | None = None
    clip: float | None = None
    via_dictionary: bool = False


@dataclass(frozen=True)
class RunResult:
    """What training one rule produced.

    Attributes
    ----------
    label : str
        The rule specification's label, e.g. ``"nesterov(rmsprop)"``.
    expression : str
        The rule with its modifiers, without a learning rate.
    learning_rate : float
        The learning rate used.
    train_loss : list of float
        Mean training loss of each epoch, over that epoch's batches (weighted by size).
    val_loss, val_accuracy : list of float
        Validation loss and accuracy (a fraction) after each epoch.
    seconds : float
        Wall time of the training loop, validation included.
    steps : int
        Optimizer steps taken.
    diverged : bool
        Whether training stopped early because the loss was not finite.
    """

    label: str
    expression: str
    learning_rate: float
    train_loss: list[float]
    val_loss: list[float]
    val_accuracy: list[float]
    seconds: float
    steps: int
    diverged: bool

    @property
    def final_train_loss(self) -> float:
        """The last epoch's mean training loss (NaN if there was none)."""
        return self.train_loss[-1] if self.train_loss else math.nan

    @property
    def final_val_accuracy(self) -> float:
        """Validation accuracy after the last epoch (NaN if there was none)."""
        return self.val_accuracy[-1] if self.val_accuracy else math.nan

    @property
    def steps_per_second(self) -> float:
        """Steps per second of wall time."""
        return self.steps / self.seconds if self.seconds > 0 else math.nan


def build_mlp(num_features: int, hidden: Sequence[int], num_classes: int, seed: int) -> nn.Sequential:
    """A multilayer perceptron with ReLU hidden layers, initialised from ``seed``.

    Parameters
    ----------
    num_features : int
        Inputs per example.
    hidden : sequence of int
        Units of each hidden layer (may be empty: a linear classifier).
    num_classes : int
        Output units (logits).
    seed : int
        Seeds the initial weights; the global random state is left as it was.

    Returns
    -------
    nn.Sequential

    Examples
    --------
    >>> build_mlp(64, [128], 10, seed=0)
    Sequential(
      (0): Linear(in_features=64, out_features=128, bias=True)
      (1): ReLU()
      (2): Linear(in_features=128, out_features=10, bias=True)
    )
    """
    sizes = [num_features, *hidden, num_classes]
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            layers.append(nn.Linear(fan_in, fan_out))
            if index < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (a fraction) of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).to(torch.float64).mean()
    return float(loss), float(accuracy)


def training_step(
    optimizer: Optimizer,
    loss: Tensor,
    params: Sequence[Tensor],
    weights: Sequence[Tensor] = (),
    max_norm: float | None = None,
    clip: float | None = None,
) -> None:
    """One step of ``optimizer`` on ``loss``, with optional clipping and max-norm constraint.

    Parameters
    ----------
    optimizer : Optimizer
        Optimizes exactly ``params``, in this order.
    loss : Tensor
        Scalar loss.
    params : sequence of Tensor
        The optimizer's parameters.
    weights : sequence of Tensor, optional
        The parameters ``max_norm`` applies to (weight matrices).
    max_norm : float, optional
        Each weight's proposed value in the update dictionary is replaced by
        ``norm_constraint(value, max_norm)``: one norm per output unit.
    clip : float, optional
        The gradients are rescaled by ``total_norm_constraint(grads, clip)`` first.
    """
    if clip is None and max_norm is None:
        optimizer.step(loss)
        return
    grads = get_or_compute_grads(loss, params)
    if clip is not None:
        grads = total_norm_constraint(grads, clip)
    proposal = optimizer.updates(grads)
    if max_norm is not None:
        for weight in weights:
            proposal[weight] = norm_constraint(proposal[weight], max_norm)
    apply_updates(proposal)


def train_rule(
    spec: RuleSpec,
    initial_model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    on_step: Callable[[], object] | None = None,
    on_epoch: Callable[[int, float, float], object] | None = None,
) -> RunResult:
    """Train a copy of ``initial_model`` with one rule.

    Parameters
    ----------
    spec : RuleSpec
        The rule, its modifiers and learning rate.
    initial_model : nn.Module
        Copied, never modified, so every rule starts from the same weights.
    data : Dataset
        Training and validation sets.
    config : TrainConfig
        Epochs, batch size, seed, engine, constraints.
    on_step : callable, optional
        Called after every step (e.g. to advance a progress bar).
    on_epoch : callable, optional
        Called after every epoch with the epoch number (from 1), its training loss and
        the validation accuracy.

    Returns
    -------
    RunResult
        Training stops early, with ``diverged`` set, after an epoch whose loss is not finite.
    """
    model = copy.deepcopy(initial_model)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.dim() >= 2]
    if config.via_dictionary:
        optimizer = spec.build(params, engine=config.engine)
        edits = (config.max_norm, config.clip)
    else:
        optimizer = spec.build(params, engine=config.engine, max_grad_norm=config.clip)
        if config.max_norm is not None:
            optimizer = apply_norm_constraint(optimizer, config.max_norm, params=weights)
        edits = (None, None)
    order_generator = torch.Generator().manual_seed(config.seed)
    num_train = data.x_train.shape[0]
    train_losses: list[float] = []
    val_losses: list[float] = []
    val_accuracies: list[float] = []
    steps = 0
    diverged = False
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(num_train, generator=order_generator)
        total = torch.zeros((), dtype=torch.float64)
        for begin in range(0, num_train, config.batch_size):
            batch = order[begin : begin + config.batch_size]
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            training_step(optimizer, loss, params, weights, *edits)
            total += loss.detach().to(torch.float64) * batch.numel()
            steps += 1
            if on_step is not None:
                on_step()
        train_losses.append(float(total) / num_train)
        val_loss, val_accuracy = evaluate(model, data.x_val, data.y_val)
        val_losses.append(val_loss)
        val_accuracies.append(val_accuracy)
        if on_epoch is not None:
            on_epoch(epoch, train_losses[-1], val_accuracy)
        if not math.isfinite(train_losses[-1]):
            diverged = True
            break
    seconds = time.perf_counter() - start
    return RunResult(
        spec.label,
        spec.expression,
        spec.learning_rate,
        train_losses,
        val_losses,
        val_accuracies,
        seconds,
        steps,
        diverged,
    )
