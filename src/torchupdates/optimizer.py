"""The :class:`Optimizer`: a ``torch.optim.Optimizer`` that runs a chain of transforms."""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import torch
from torch import Tensor

from . import _checkpoint
from ._chain_keys import chain_name, make_stage, positions_of, state_keys
from ._groups import (
    MODIFIER_KEY,
    BetasLink,
    check_group,
    check_params,
    new_group,
    unknown_keys,
    unknown_keys_error,
)
from ._guards import GuardRecord, check_guard_options
from ._slots import LossOrGrads, init_state, run_closure, step_gradients
from ._step_scope import scoped_only_while_profiling
from ._stepping import proposals, step_again
from .apply import write_updates
from .engines import ENGINES, Engine, Stage
from .engines.compiled import require_compiler
from .transform import Transform, defaults_of

__all__ = ["Optimizer", "ParamsT", "StepOptions"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
"""Parameters: tensors, or param-group dicts with ``"params"`` and hyperparameter overrides."""


class StepOptions(TypedDict, total=False):
    """The keyword options of every rule function besides its hyperparameters: how a step
    runs and what guards it. Their defaults and meaning are those of :class:`Optimizer`."""

    engine: str
    state_dtype: torch.dtype | None
    skip_nonfinite: bool
    max_grad_norm: float | Tensor | None


class Optimizer(torch.optim.Optimizer):
    r"""A chain of update transforms, run as a ``torch.optim.Optimizer``.

    Built by the rule functions (:func:`adam`, :func:`rmsprop`, ...) and extended by the
    modifiers (:func:`apply_momentum`, :func:`apply_nesterov_momentum`). A step computes

    .. math:: u_0 = \text{rule}(p, g), \quad u_{k} = \text{modifier}_k(p, u_{k-1}),
              \quad p \leftarrow u_K

    and each transform also updates its own state.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Leaf tensors to optimize, or param groups: dicts with ``"params"`` and overrides of
        any hyperparameter (``"lr"`` and ``"learning_rate"`` both name the learning rate).
    rule : Transform
        The update rule, e.g. ``torchupdates.rules.ADAM``.
    engine : {"foreach", "reference", "compiled"}, optional
        ``"foreach"`` (default) runs each formula over all tensors of a device, dtype and
        group at once, over flat buffers the parameters and state become views of;
        ``"reference"`` runs one tensor at a time; ``"compiled"`` fuses each batch's
        formulas into one kernel. See :mod:`torchupdates.engines` for every engine.
    state_dtype : torch.dtype, optional
        Dtype for state and arithmetic of parameters of lower precision, e.g.
        ``torch.float32`` for bfloat16 parameters. Parameters of this or higher precision
        keep their own dtype. Default: every parameter's own dtype.
    skip_nonfinite : bool, optional
        Skip a step whose gradients (after clipping) hold a NaN or an infinity: nothing is
        written, state and step counters included, and :attr:`skipped_steps` counts it.
        Default False.
    max_grad_norm : float or 0-d Tensor, optional
        Rescale the gradients of every parameter the step updates to a joint norm of at
        most this, as :func:`total_norm_constraint` does, before the rule sees them;
        :attr:`grad_norm` is their norm before rescaling. Default None (no clipping).
    **hyperparameters
        Values for the rule's hyperparameters (Python numbers or 0-d tensors).

    Notes
    -----
    Hyperparameters live in ``param_groups``, plain dicts (the learning rate under
    ``"lr"``, so every ``torch.optim.lr_scheduler`` works). A 0-d tensor hyperparameter is
    read at every step: changing it in place changes the next step, and
    :meth:`load_state_dict` writes loaded values into the same tensor. State is created at
    the first step, zero, with the parameter's dtype and device. Parameters with
    ``requires_grad=False`` and, when stepping from ``.grad``, parameters whose ``.grad``
    is ``None`` are left untouched.

    **betas.** A rule with ``beta1`` and ``beta2`` (the Adam family) also keeps torch's
    ``"betas"`` key, in ``defaults`` and in every group: a tuple ``(beta1, beta2)``, so that
    ``OneCycleLR`` and ``CyclicLR`` can cycle ``beta1`` as on ``torch.optim.Adam``. Set
    either side; before each step (and :meth:`updates` and :meth:`state_dict`) the
    optimizer makes them agree again, and the side that changed since the last step wins.
    Changing both to different values between two steps raises a ``ValueError``. The values
    checked are the agreed ones, and they are written only when every check passes: a step
    that raises leaves ``"betas"``, ``"beta1"`` and ``"beta2"`` as they were set, so setting
    the same side again (or the other side back) repairs it.

    **torch.compile.** A training step that calls :meth:`step` compiles;
    ``torch.compile(opt.step, fullgraph=True)`` is one graph when gradients come from
    ``.grad`` or a list (a loss or a closure needs autograd: a graph break). Traced, a step
    runs the per-tensor formulas whatever the engine (the compiler fuses them), computes
    bias corrections from the step counters as tensors (no host read) and does not check
    the range of 0-d tensor hyperparameters; it follows the eager trajectory to rounding.
    A number changed between compiled steps (a scheduler's ``group["lr"]``) recompiles the
    step; a 0-d tensor changed in place does not.
    """

    _stages: tuple[Stage, ...]
    _guards: GuardRecord

    def __init__(
        self,
        params: ParamsT,
        rule: Transform,
        *,
        engine: str = "foreach",
        state_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        max_grad_norm: float | Tensor | None = None,
        _chain: tuple[tuple[Stage, ...], dict[str, Any]] | None = None,
        _modifier_follows: bool = False,
        **hyperparameters: Any,
    ) -> None:
        self.engine = engine
        self.state_dtype = state_dtype
        self.skip_nonfinite = skip_nonfinite
        self.max_grad_norm = max_grad_norm
        self._check_options()
        if _chain is None:
            stage = make_stage(rule, (), (), None)
            self._stages = (stage,)
            values = defaults_of(rule, hyperparameters)
            defaults = {stage.hyper_keys[name]: value for name, value in values.items()}
        else:  # compose: stages built, defaults (by group key) checked
            self._stages, defaults = _chain
        self._betas = BetasLink(self._stages)
        self._betas.link(defaults)
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                f"parameters must be given in an ordered collection (a list), not a {type(params).__name__}, "
                "whose order may change between runs"
            )
        if isinstance(params, dict):
            raise TypeError("params must be an iterable of tensors or of param-group dicts; put one group in a list")
        # The rule functions momentum() and nesterov_momentum() build sgd and compose their
        # modifier at once, so their groups may hold the modifier's "momentum": that one key is
        # left to the composed optimizer, which checks it. Any other unknown key raises here.
        self._modifier_follows = _modifier_follows
        super().__init__(params, defaults)
        first = next((p for group in self.param_groups for p in group["params"]), None)
        self._guards = GuardRecord(None if first is None else first.device)
        self._modifier_follows = False
        self._check_engine()

    def compose(self, modifier: Transform, params: Iterable[Tensor] | None = None, **hyperparameters: Any) -> Optimizer:
        """A new optimizer running this chain followed by ``modifier``.

        The new optimizer takes over this one's param groups (copied dicts, same tensors and
        hyperparameter objects) and state (same tensors); step only the new one afterwards.
        ``params`` restricts the modifier to some parameters (``None``: all).
        """
        values = defaults_of(modifier, hyperparameters)
        self._betas.reconcile(self.param_groups)  # the groups are copied as they stand
        members = None if params is None else positions_of(self.param_groups, params, modifier.name)
        stage = make_stage(modifier, self.defaults, state_keys(self._stages), members)
        defaults = {**self.defaults, **{stage.hyper_keys[name]: value for name, value in values.items()}}
        composed = type(self)(
            [dict(group) for group in self.param_groups],
            self._stages[0].transform,
            **self._step_options(),
            _chain=((*self._stages, stage), defaults),
        )
        composed._guards = self._guards.copy()
        for param, state in self.state.items():
            composed.state[param] = dict(state)
        return composed

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the chain is needed too.
        state = super().__getstate__()
        state.update(
            self._step_options(),
            _guards=self._guards.copy(),
            _stages=self._stages,
            _betas=self._betas,
        )
        return state

    def _step_options(self) -> StepOptions:
        return StepOptions(
            engine=self.engine,
            state_dtype=self.state_dtype,
            skip_nonfinite=self.skip_nonfinite,
            max_grad_norm=self.max_grad_norm,
        )

    @property
    def grad_norm(self) -> Tensor | None:
        """The joint norm of the last step's gradients before clipping (a 0-d tensor, read
        without a host sync), or ``None`` before the first step and without ``max_grad_norm``."""
        return self._guards.norm[0]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_nonfinite`` (saved in the state dict). Steps traced by
        ``torch.compile`` count on the device, read here (one host read)."""
        return self._guards.skipped_steps()

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._guards.set_skipped_steps(value)

    @property
    def rule_name(self) -> str:
        """The chain as a call expression, e.g. ``"apply_momentum(rmsprop)"``."""
        return chain_name(self._stages)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.rule_name}, engine={self.engine!r})"]
        for index, group in enumerate(self.param_groups):
            settings = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
            lines.append(f"  group {index}: {len(group['params'])} params, {settings}")
        return "\n".join(lines)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checking its parameters and hyperparameters first.

        Keys not given take the optimizer's defaults; ``"learning_rate"`` is stored as
        ``"lr"``, and ``"betas"`` may stand for ``beta1`` and ``beta2``. Parameters may be
        ``(name, tensor)`` pairs (``named_parameters()``), recorded under ``"param_names"``
        as torch does. A key the chain does not have, a parameter listed twice and a
        parameter already in another group are errors. Nothing is added when a check fails.
        """
        flat = (param for group in self.param_groups for param in group["params"])
        taken = {id(param): position for position, param in enumerate(flat)}
        group = new_group(
            param_group,
            self.defaults,
            len(taken),
            self._betas.keys,
            index=len(self.param_groups),
            owner=self.rule_name,
            taken=taken,
        )
        check_group(group, len(self.param_groups), self._stages, self.rule_name)
        unknown = unknown_keys(group, self.defaults)
        if unknown and not (self.__dict__.get("_modifier_follows") and all(map(MODIFIER_KEY.fullmatch, unknown))):
            raise unknown_keys_error(len(self.param_groups), unknown, self.defaults, self.rule_name)
        super().add_param_group(group)
        self._params_seen = [tuple(group["params"]) for group in self.param_groups]  # all checked
        self._betas.added(group)

    def _check_options(self, traced: bool = False) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {sorted(ENGINES)}")
        if "param_groups" in self.__dict__ and self.__dict__.get("_checked_engine") != self.engine:
            self._check_engine()
        if self.state_dtype is not None and not (
            isinstance(self.state_dtype, torch.dtype) and self.state_dtype.is_floating_point
        ):
            raise TypeError(f"state_dtype must be a floating-point torch.dtype, got {self.state_dtype!r}")
        check_guard_options(self.skip_nonfinite, self.max_grad_norm, read_tensor=not traced)

    def _check_engine(self) -> None:
        """Raise now, not at the first step, when the engine cannot run here (a compiled
        engine without a compiler for the parameters' devices)."""
        if self.engine == "compiled":
            require_compiler({p.device.type for group in self.param_groups for p in group["params"]} or {"cpu"})
        self._checked_engine = self.engine

    # --- stepping ----------------------------------------------------------------------

    def updates(
        self, loss_or_grads: LossOrGrads = None, *, closure: Callable[[], Any] | None = None
    ) -> OrderedDict[Tensor, Tensor]:
        """The update dictionary of one step, without writing anything.

        Parameters
        ----------
        loss_or_grads : Tensor, list of Tensor, callable or None
            A scalar loss (gradients by ``torch.autograd.grad``; ``.grad`` is not touched),
            one gradient per parameter in param-group order (``None`` entries skip a
            parameter), a closure that computes the loss and fills ``.grad``, or ``None``
            to use each parameter's ``.grad``.
        closure : callable, optional
            The closure by keyword, as ``torch.optim`` takes it (``step(closure=...)``).

        Returns
        -------
        OrderedDict
            Every updated parameter and every one of its state tensors (step counters
            included) mapped to its proposed new value. Edit it freely, then write it with
            :func:`apply_updates`.
        """
        _, loss_or_grads = run_closure(loss_or_grads, closure)
        traced = self._check_inputs()
        per_slot: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for batch in proposals(self, loss_or_grads, write=False, traced=traced):
            per_slot.update(batch)
        # torch's schedulers watch step() to warn when they run before any optimizer step;
        # an update dictionary is a step too, so tell them.
        self._opt_called = True
        return OrderedDict(pair for index in sorted(per_slot) for pair in per_slot[index])

    # The first parameter also takes torch's closure, positionally or as closure=.
    @scoped_only_while_profiling
    def step(self, loss_or_grads: LossOrGrads = None, *, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update every parameter that has a gradient: ``apply_updates(self.updates(x))``.

        Parameters
        ----------
        loss_or_grads : Tensor, list of Tensor, callable or None
            As for :meth:`updates`.
        closure : callable, optional
            The closure by keyword, as ``torch.optim`` takes it (``step(closure=...)``).

        Returns
        -------
        The closure's loss when given a closure, the loss when given a loss, else ``None``.
        """
        loss, loss_or_grads = run_closure(loss_or_grads, closure)
        if isinstance(loss_or_grads, Tensor):
            loss = loss_or_grads
        traced = self._check_inputs()
        if not traced:
            # A loss is differentiated once, here: the steady state and the ordinary step take
            # the same list of gradients.
            if loss_or_grads is not None:
                loss_or_grads = step_gradients(loss_or_grads, self.param_groups)
            if step_again(self, loss_or_grads):
                return loss
        # Batches touch disjoint tensors and every input is checked before the first, so writing
        # each as it comes (hot in cache; the engine may write some itself) is apply(updates(x)).
        for batch in proposals(self, loss_or_grads, write=True, traced=traced):
            write_updates(OrderedDict(pair for _, pairs in batch for pair in pairs))
        return loss

    def _check_inputs(self) -> bool:
        """Check the options and every param group (once per step, before anything else) and
        say whether the step is being traced by torch.compile."""
        # Decided here once and passed down: after a graph break, dynamo compiles callees as
        # frames of their own, which would answer True while this step runs eagerly.
        traced = torch.compiler.is_compiling()
        self._check_options(traced)
        self._check_params()
        changes = self._betas.reconciled(self.param_groups)
        for index, (group, change) in enumerate(zip(self.param_groups, changes, strict=True)):
            check_group({**group, **change} if change else group, index, self._stages, self.rule_name, traced)
        self._betas.write(self.param_groups, changes)
        return traced

    def _check_params(self) -> None:
        """Check the groups' parameter lists again when they changed since the last check
        (entries appended or replaced by hand): leaf floating-point tensors, each once."""
        seen: list[tuple[Tensor, ...]] | None = self.__dict__.get("_params_seen")
        groups = self.param_groups
        if (
            seen is not None
            and len(seen) == len(groups)
            and all(
                len(group["params"]) == len(old) and all(map(operator.is_, group["params"], old))
                for group, old in zip(groups, seen, strict=True)
            )
        ):
            return
        check_params(groups)
        self._params_seen = [tuple(group["params"]) for group in groups]

    def _init_group(self, positions: tuple[int, ...]) -> None:
        """Create the missing state of the parameters at ``positions`` (flat order). Named as
        torch.optim's: torch.compile runs it eagerly instead of tracing it (one graph, not two)."""
        flat = [param for group in self.param_groups for param in group["params"]]
        for position in positions:
            init_state(self.state[flat[position]], flat[position], position, self._stages, self.state_dtype)

    def _engine_runner(self) -> Engine:
        """This optimizer's instance of its engine, made at first use (engines may keep
        buffers between steps; a copy or an unpickled optimizer makes its own)."""
        runners: dict[str, Engine] = self.__dict__.setdefault("_engine_runners", {})
        if self.engine not in runners:
            runners[self.engine] = ENGINES[self.engine]()
        return runners[self.engine]

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"rule"`` (the chain's name, checked when loading) and
        ``"state_dtype"`` (this optimizer's, as a dtype name or ``None``)."""
        self._betas.reconcile(self.param_groups)
        return _checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, for a bitwise-exact continuation.

        On top of torch's behaviour: everything is checked against this optimizer's chain
        before anything is loaded (groups and their keys and values, every state entry's
        presence, type, shape and dtype; a mismatch raises and changes nothing), state kept
        in ``state_dtype`` is restored in that dtype, and a hyperparameter held as a 0-d
        tensor keeps its identity (the loaded value is written into it), so code that
        changes it in place keeps working. Saved state is never narrowed: state saved in a
        wider dtype than this optimizer keeps (a checkpoint of an optimizer built with
        ``state_dtype=torch.float32``, loaded into one built without) is a ``ValueError``
        naming the ``state_dtype`` to build the optimizer with.
        """
        _checkpoint.load_state_dict(self, state_dict)
        self._betas.loaded(self.param_groups)
