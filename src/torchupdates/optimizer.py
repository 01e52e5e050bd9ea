"""The :class:`Optimizer`: a ``torch.optim.Optimizer`` that runs a chain of transforms."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .apply import apply_updates
from .engines import ENGINES, Batch, Engine, Slot, Stage
from .grads import check_leaf, compute_grads, describe
from .transform import Transform, check_hyperparameter, defaults_of, zero_state

__all__ = ["Optimizer", "ParamsT"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
"""Parameters: tensors, or param-group dicts with ``"params"`` and hyperparameter overrides."""

LossOrGrads = Tensor | Sequence[Tensor | None] | Callable[[], Any] | None
"""What a step takes: a scalar loss, one gradient per parameter, a closure, or ``None``."""

_ALIASES = {"learning_rate": "lr"}  # torch's schedulers read and write group["lr"]


class ParamGroup(dict[str, Any]):
    """A param group (a plain dict of settings) that also answers torch's ``"betas"``.

    torch.optim keeps Adam's decay rates as ``group["betas"]``, and the schedulers that
    cycle momentum (``OneCycleLR``, ``CyclicLR``) read and write that key. Here the rules
    keep ``"beta1"`` and ``"beta2"``, so ``group["betas"]`` is a view of the pair: reading
    gives ``(beta1, beta2)`` and assigning a pair sets both. Everything else is a dict.
    """

    def __contains__(self, key: object) -> bool:
        if key == "betas":
            return dict.__contains__(self, "beta1") and dict.__contains__(self, "beta2")
        return dict.__contains__(self, key)

    def __getitem__(self, key: Any) -> Any:
        if key == "betas" and "betas" in self:
            return (dict.__getitem__(self, "beta1"), dict.__getitem__(self, "beta2"))
        return dict.__getitem__(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key == "betas" and "betas" in self:
            beta1, beta2 = value
            dict.__setitem__(self, "beta1", beta1)
            dict.__setitem__(self, "beta2", beta2)
            return
        dict.__setitem__(self, key, value)


def _free_key(name: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    if name not in taken:
        return name
    suffix = 2
    while f"{name}_{suffix}" in taken:
        suffix += 1
    return f"{name}_{suffix}"


def _make_stage(
    transform: Transform, taken_hyper: Iterable[str], taken_state: Iterable[str], members: frozenset[int] | None
) -> Stage:
    taken_hyper, taken_state = set(taken_hyper), set(taken_state)
    hyper_keys: dict[str, str] = {}
    for spec in transform.hyperparameters:
        key = _free_key(_ALIASES.get(spec.name, spec.name), taken_hyper)
        hyper_keys[spec.name] = key
        taken_hyper.add(key)
    state_keys: dict[str, str] = {}
    for name in transform.state:
        key = _free_key(name, taken_state)
        state_keys[name] = key
        taken_state.add(key)
    step_key = _free_key("step", taken_state) if transform.counts_steps else None
    return Stage(transform, hyper_keys, state_keys, step_key, members)


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
    engine : {"foreach", "reference"}, optional
        ``"foreach"`` (default) runs each formula over all tensors of a device, dtype and
        group at once; ``"reference"`` runs one tensor at a time. In float64 both give
        bitwise identical results.
    state_dtype : torch.dtype, optional
        Dtype for state and arithmetic of parameters of lower precision, e.g.
        ``torch.float32`` for bfloat16 parameters. Parameters of this or higher precision
        keep their own dtype. Default: every parameter's own dtype.
    **hyperparameters
        Values for the rule's hyperparameters (Python numbers or 0-d tensors).

    Notes
    -----
    Hyperparameters live in ``param_groups`` (the learning rate under ``"lr"``, so every
    ``torch.optim.lr_scheduler`` works). A 0-d tensor hyperparameter is read at every step:
    changing it in place changes the next step, and :meth:`load_state_dict` writes loaded
    values into the same tensor. State is created at the first step, zero, with the
    parameter's dtype and device. Parameters with ``requires_grad=False`` and, when
    stepping from ``.grad``, parameters whose ``.grad`` is ``None`` are left untouched.
    """

    _stages: tuple[Stage, ...]

    def __init__(
        self,
        params: ParamsT,
        rule: Transform,
        *,
        engine: str = "foreach",
        state_dtype: torch.dtype | None = None,
        **hyperparameters: Any,
    ) -> None:
        self.engine = engine
        self.state_dtype = state_dtype
        self._check_options()
        stage = _make_stage(rule, (), (), None)
        self._stages = (stage,)
        values = defaults_of(rule, hyperparameters)
        super().__init__(params, ParamGroup({stage.hyper_keys[name]: value for name, value in values.items()}))

    def compose(self, modifier: Transform, params: Iterable[Tensor] | None = None, **hyperparameters: Any) -> Optimizer:
        """A new optimizer running this chain followed by ``modifier``.

        The new optimizer takes over this one's param groups (copied dicts, same tensors and
        hyperparameter objects) and state (same tensors); step only the new one afterwards.
        ``params`` restricts the modifier to some parameters (``None``: all).
        """
        values = defaults_of(modifier, hyperparameters)
        members = None if params is None else self._positions_of(params, modifier.name)
        taken_hyper = set(self.defaults)
        taken_state = {key for stage in self._stages for key in (*stage.state_keys.values(), stage.step_key) if key}
        stage = _make_stage(modifier, taken_hyper, taken_state, members)
        defaults = ParamGroup(self.defaults)
        defaults.update({stage.hyper_keys[name]: value for name, value in values.items()})

        composed = type(self).__new__(type(self))
        composed.engine = self.engine
        composed.state_dtype = self.state_dtype
        composed._stages = (*self._stages, stage)
        groups = [dict(group) for group in self.param_groups]
        torch.optim.Optimizer.__init__(composed, groups, defaults)
        for param, state in self.state.items():
            composed.state[param] = dict(state)
        return composed

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the chain is needed too.
        state = super().__getstate__()
        state.update(engine=self.engine, state_dtype=self.state_dtype, _stages=self._stages)
        return state

    @property
    def rule_name(self) -> str:
        """The chain as a call expression, e.g. ``"apply_momentum(rmsprop)"``."""
        name = self._stages[0].transform.name
        for stage in self._stages[1:]:
            subset = "" if stage.members is None else f", {len(stage.members)} params"
            name = f"{stage.transform.name}({name}{subset})"
        return name

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.rule_name}, engine={self.engine!r})"]
        for index, group in enumerate(self.param_groups):
            settings = ", ".join(f"{k}={v!r}" for k, v in group.items() if k != "params")
            lines.append(f"  group {index}: {len(group['params'])} params, {settings}")
        return "\n".join(lines)

    # --- param groups -------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checking its parameters and hyperparameters first.

        Keys not given take the optimizer's defaults; ``"learning_rate"`` is stored as
        ``"lr"``. Nothing is added when a check fails.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        group = ParamGroup(param_group)
        params = group.get("params")
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("parameters must be given in an ordered collection (a list), not a set")
        elif params is None:
            raise ValueError("a param group needs a 'params' entry")
        group["params"] = list(params)
        offset = sum(len(g["params"]) for g in getattr(self, "param_groups", []))
        for position, param in enumerate(group["params"], offset):
            check_leaf(position, param)
            if not (param.is_floating_point() or param.is_complex()):
                raise TypeError(f"{describe(position, param)} must be floating point or complex to be optimized")
        for alias, key in _ALIASES.items():
            if alias in group:
                value = group.pop(alias)
                if key in group:
                    raise ValueError(f"param group gives both {alias!r} and {key!r}; give one")
                group[key] = value
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, len(getattr(self, "param_groups", [])))
        super().add_param_group(group)

    def _check_group(self, group: Mapping[str, Any], index: int) -> None:
        for alias, key in _ALIASES.items():
            if alias in group:
                raise ValueError(f"param group {index} has {alias!r}, which is kept as {key!r}: set group[{key!r}]")
        for stage in self._stages:
            for spec in stage.transform.hyperparameters:
                check_hyperparameter(f"{self.rule_name}, param group {index}", spec, group[stage.hyper_keys[spec.name]])

    def _check_options(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {sorted(ENGINES)}")
        if self.state_dtype is not None and not (
            isinstance(self.state_dtype, torch.dtype) and self.state_dtype.is_floating_point
        ):
            raise TypeError(f"state_dtype must be a floating-point torch.dtype, got {self.state_dtype!r}")

    def _flat_params(self) -> list[tuple[int, Tensor]]:
        return [(index, p) for index, group in enumerate(self.param_groups) for p in group["params"]]

    def _positions_of(self, params: Iterable[Tensor], who: str) -> frozenset[int]:
        if isinstance(params, Tensor):
            params = [params]
        position_by_id = {id(p): i for i, (_, p) in enumerate(self._flat_params())}
        positions = set()
        for param in params:
            if id(param) not in position_by_id:
                shape = tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__
                raise ValueError(f"{who}: a parameter ({shape}) is not optimized by this optimizer")
            positions.add(position_by_id[id(param)])
        return frozenset(positions)

    def _work_dtype(self, param: Tensor) -> torch.dtype:
        dtype = torch.view_as_real(param).dtype if param.is_complex() else param.dtype
        if self.state_dtype is not None and self.state_dtype.itemsize > dtype.itemsize and not param.is_complex():
            return self.state_dtype
        return dtype

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
        _, loss_or_grads = self._run_closure(loss_or_grads, closure)
        per_slot: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for batch in self._proposals(loss_or_grads, write=False):
            per_slot.update(batch)
        # torch's schedulers watch step() to warn when they run before any optimizer step;
        # an update dictionary is a step too, so tell them.
        self._opt_called = True
        return OrderedDict(pair for index in sorted(per_slot) for pair in per_slot[index])

    # The first parameter also takes torch's closure, positionally or as closure=.
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
        loss, loss_or_grads = self._run_closure(loss_or_grads, closure)
        if isinstance(loss_or_grads, Tensor):
            loss = loss_or_grads
        # Each batch is written as soon as it is computed (while its tensors are in cache), and
        # the engine may write some results in place itself. Batches touch disjoint tensors and
        # every input was checked before the first one, so this writes exactly the values
        # apply_updates(self.updates(x)) would.
        for batch in self._proposals(loss_or_grads, write=True):
            apply_updates(OrderedDict(pair for _, pairs in batch for pair in pairs))
        return loss

    @staticmethod
    def _run_closure(loss_or_grads: LossOrGrads, closure: Callable[[], Any] | None) -> tuple[Any, LossOrGrads]:
        """Call the closure, if any, and return its loss and what to take gradients from."""
        if closure is not None:
            if loss_or_grads is not None:
                raise TypeError("give either loss_or_grads or closure, not both")
            loss_or_grads = closure
        if callable(loss_or_grads) and not isinstance(loss_or_grads, Tensor):
            with torch.enable_grad():
                return loss_or_grads(), None
        return None, loss_or_grads

    def _proposals(self, loss_or_grads: LossOrGrads, write: bool) -> Iterator[Batch]:
        slots = self._slots(loss_or_grads)
        hyperparameters = [
            [{name: group[key] for name, key in stage.hyper_keys.items()} for stage in self._stages]
            for group in self.param_groups
        ]
        with torch.no_grad():
            yield from self._engine_runner()(self._stages, slots, hyperparameters, write)

    def _engine_runner(self) -> Engine:
        """This optimizer's instance of its engine, made at first use (engines may keep
        buffers between steps; a copy or an unpickled optimizer makes its own)."""
        runners: dict[str, Engine] = self.__dict__.setdefault("_engine_runners", {})
        if self.engine not in runners:
            runners[self.engine] = ENGINES[self.engine]()
        return runners[self.engine]

    def _slots(self, loss_or_grads: LossOrGrads) -> list[Slot]:
        self._check_options()
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)
        flat = self._flat_params()
        grads = self._gradients(loss_or_grads, flat)
        checked = [
            (position, group, param, self._checked_grad(position, group, param, grad))
            for position, ((group, param), grad) in enumerate(zip(flat, grads, strict=True))
            if grad is not None and param.requires_grad
        ]
        return [self._slot(position, group, param, grad) for position, group, param, grad in checked]

    def _gradients(self, loss_or_grads: LossOrGrads, flat: list[tuple[int, Tensor]]) -> list[Tensor | None]:
        if loss_or_grads is None:
            return [p.grad for _, p in flat]
        if isinstance(loss_or_grads, Tensor):
            trainable = [(i, g, p) for i, (g, p) in enumerate(flat) if p.requires_grad]
            grads = compute_grads(
                loss_or_grads, [p for _, _, p in trainable], [describe(i, p, g) for i, g, p in trainable]
            )
            by_position: dict[int, Tensor] = {i: grad for (i, _, _), grad in zip(trainable, grads, strict=True)}
            return [by_position.get(i) for i in range(len(flat))]
        if isinstance(loss_or_grads, (list, tuple)):
            if len(loss_or_grads) != len(flat):
                raise ValueError(f"got {len(loss_or_grads)} gradients for {len(flat)} parameters")
            return list(loss_or_grads)
        raise TypeError(
            "loss_or_grads must be a scalar loss tensor, a list of gradients, a closure or None; "
            f"got {type(loss_or_grads).__name__}"
        )

    def _checked_grad(self, position: int, group: int, param: Tensor, grad: object) -> Tensor:
        if (
            isinstance(grad, Tensor)
            and not grad.is_sparse
            and grad.dtype == param.dtype
            and grad.shape == param.shape
            and grad.device == param.device
        ):
            return grad
        name = describe(position, param, group)
        if not isinstance(grad, Tensor):
            raise TypeError(f"the gradient of {name} must be a tensor or None, got {type(grad).__name__}")
        if grad.is_sparse:
            if not self._stages[0].transform.accepts_sparse:
                raise TypeError(f"{self.rule_name} does not support sparse gradients ({name})")
            return self._checked_grad(position, group, param, grad.to_dense())
        if grad.is_complex() != param.is_complex():
            kinds = ("complex", "real") if param.is_complex() else ("real", "complex")
            raise TypeError(f"{name} is {kinds[0]} but its gradient is {kinds[1]}; they cannot be mixed")
        if grad.shape != param.shape:
            raise ValueError(f"the gradient of {name} has shape {tuple(grad.shape)}")
        if grad.dtype != param.dtype:
            raise TypeError(f"the gradient of {name} has dtype {grad.dtype}; cast it to {param.dtype}")
        raise ValueError(f"the gradient of {name} is on {grad.device}, the parameter on {param.device}")

    def _slot(self, position: int, group: int, param: Tensor, grad: Tensor) -> Slot:
        state = self.state[param]
        work_dtype = self._work_dtype(param)
        state_dtype = work_dtype if work_dtype != param.dtype and not param.is_complex() else None
        steps: list[int | None] = []
        applies: list[bool] = []
        formula_state: dict[str, Tensor] = {}
        counters: dict[str, Tensor] = {}
        for stage in self._stages:
            acts = stage.applies_to(position)
            applies.append(acts)
            steps.append(None)
            if not acts:
                continue
            for key in stage.state_keys.values():
                if key not in state:
                    state[key] = zero_state(param, state_dtype)
                formula_state[key] = state[key]
            if stage.step_key is not None:
                if stage.step_key not in state:
                    state[stage.step_key] = torch.zeros((), dtype=torch.int64)
                counters[stage.step_key] = state[stage.step_key]
                steps[-1] = int(state[stage.step_key]) + 1
        return Slot(param, grad, formula_state, counters, group, tuple(steps), tuple(applies), work_dtype)

    # --- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"rule"``: the chain's name, checked when loading."""
        state_dict = super().state_dict()
        state_dict["rule"] = self.rule_name
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, for a bitwise-exact continuation.

        On top of torch's behaviour: the state is checked against this optimizer's chain,
        state kept in ``state_dtype`` is restored in that dtype, and a hyperparameter held
        as a 0-d tensor keeps its identity (the loaded value is written into it), so code
        that changes it in place keeps working.
        """
        self._check_loaded_state(state_dict)
        held = [
            {key: value for key, value in group.items() if isinstance(value, Tensor) and key != "params"}
            for group in self.param_groups
        ]
        super().load_state_dict(state_dict)
        self.param_groups[:] = [ParamGroup(group) for group in self.param_groups]
        for group, tensors in zip(self.param_groups, held, strict=True):
            for key, tensor in tensors.items():
                loaded = group.get(key)
                if isinstance(loaded, (Tensor, int, float)) and not isinstance(loaded, bool):
                    with torch.no_grad():
                        tensor.copy_(torch.as_tensor(loaded, dtype=tensor.dtype))
                    group[key] = tensor
        flat = [p for group in self.param_groups for p in group["params"]]
        saved_positions = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        counters = {stage.step_key for stage in self._stages}
        for saved_id, param in zip(saved_positions, flat, strict=True):
            saved = state_dict["state"].get(saved_id)
            work_dtype = self._work_dtype(param)
            if saved is None or work_dtype == param.dtype or param.is_complex():
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor) and key not in counters:
                    self.state[param][key] = value.to(device=param.device, dtype=work_dtype, copy=True)

    def _check_loaded_state(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        saved_rule = state_dict.get("rule", self.rule_name)
        if saved_rule != self.rule_name:
            raise ValueError(f"the state dict was saved from {saved_rule}, this optimizer is {self.rule_name}")
        for index, group in enumerate(state_dict["param_groups"]):
            missing = {key for stage in self._stages for key in stage.hyper_keys.values() if key not in group}
            if missing:
                raise ValueError(
                    f"saved param group {index} lacks {sorted(missing)}, which {self.rule_name} needs: "
                    "was it saved from another rule?"
                )
        saved_positions = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        for position, saved_id in enumerate(saved_positions):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            expected = {
                key
                for stage in self._stages
                if stage.applies_to(position)
                for key in (*stage.state_keys.values(), stage.step_key)
                if key is not None
            }
            if not set(saved) <= expected:
                raise ValueError(
                    f"the saved state of parameter {position} has entries {sorted(saved)}, "
                    f"but {self.rule_name} keeps {sorted(expected)}: was it saved from another rule?"
                )
