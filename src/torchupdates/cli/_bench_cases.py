"""What ``bench`` measures: the cases (rules and compositions), the workload, the timing.

A :class:`Case` is one optimizer configuration: how to build it on each engine, how many
tensors a step must read and write per element, and torch.optim's equivalent when there is
one. A :class:`Workload` is the list of parameter shapes. :func:`interleaved_medians` times
several steppers, one step of each in turn, so that the machine's
drift (other processes, clock changes) hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..modifiers import apply_norm_constraint
from ..optimizer import Optimizer
from ..registry import MODIFIERS, RULES, Entry
from ._command import CommandError

__all__ = [
    "CASES",
    "COMPOSITIONS",
    "ISSUE_SHAPES",
    "STEP_OPTIONS",
    "Case",
    "Workload",
    "interleaved_medians",
    "make_params",
    "resolve_device",
    "synchronize",
]

TorchFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class Case:
    """A rule or composition, the tensors a step must move per element, and torch.optim's
    equivalent (``None`` for compositions torch.optim does not have)."""

    rule: str
    moved: int  # reads + writes of parameter, gradient and state, per element
    build: Callable[[list[torch.Tensor], str], Optimizer]
    torch_optim: TorchFactory | None = None
    torch_fused: bool = False  # whether torch.optim's version has fused=True

    def torch_variants(self) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
        """torch.optim's implementations of this case, by column label."""
        factory = self.torch_optim
        if factory is None:
            return {}
        variants = {
            "torch single": lambda p: factory(p, foreach=False),
            "torch foreach": lambda p: factory(p, foreach=True),
        }
        if self.torch_fused:
            variants["torch fused"] = lambda p: factory(p, fused=True)
        return variants


_LEARNING_RATE = 0.01
"""The learning rate of the rules whose default is none or 1 (torch.optim's the same)."""

_TORCH: dict[str, tuple[TorchFactory, bool]] = {
    "sgd": (lambda p, **k: torch.optim.SGD(p, _LEARNING_RATE, **k), True),
    "momentum": (lambda p, **k: torch.optim.SGD(p, _LEARNING_RATE, momentum=0.9, **k), True),
    "nesterov_momentum": (
        lambda p, **k: torch.optim.SGD(p, _LEARNING_RATE, momentum=0.9, nesterov=True, **k),
        True,
    ),
    "adagrad": (lambda p, **k: torch.optim.Adagrad(p, _LEARNING_RATE, **k), True),
    "rmsprop": (lambda p, **k: torch.optim.RMSprop(p, _LEARNING_RATE, **k), False),
    "adadelta": (lambda p, **k: torch.optim.Adadelta(p, **k), False),
    "adam": (lambda p, **k: torch.optim.Adam(p, **k), True),
    "adamax": (lambda p, **k: torch.optim.Adamax(p, **k), False),
    "amsgrad": (lambda p, **k: torch.optim.Adam(p, amsgrad=True, **k), True),
}
"""torch.optim's equivalent of each rule of the registry, and whether it has ``fused=True``."""

_OWN_LEARNING_RATE = ("sgd", "momentum", "nesterov_momentum", "adagrad", "rmsprop")
"""Rules stepped with :data:`_LEARNING_RATE`; the others with their defaults, as torch's."""


def _moved(entry: Entry) -> int:
    """Reads and writes per element: parameter read and written, gradient read, each state both."""
    return 3 + 2 * len(entry.state)


def _builder(name: str, *modifiers: str) -> Callable[[list[torch.Tensor], str], Optimizer]:
    factory = RULES[name].factory
    keywords = {"learning_rate": _LEARNING_RATE} if name in _OWN_LEARNING_RATE else {}

    def build(params: list[torch.Tensor], engine: str) -> Optimizer:
        optimizer = factory(params, engine=engine, **keywords)
        for modifier in modifiers:
            optimizer = MODIFIERS[modifier].factory(optimizer)
        return optimizer

    return build


def _rule_case(entry: Entry) -> Case:
    torch_optim, fused = _TORCH[entry.name]
    return Case(entry.name, _moved(entry), _builder(entry.name), torch_optim, fused)


def _composition(modifier: str, name: str) -> Case:
    entry = RULES[name]
    moved = _moved(entry) + 2 * len(MODIFIERS[modifier].state)  # the velocity, read and written once
    return Case(f"{modifier}({name})", moved, _builder(name, modifier))


_RULES: tuple[Case, ...] = tuple(_rule_case(entry) for entry in RULES.values())

COMPOSITIONS: tuple[Case, ...] = (
    _composition("apply_momentum", "adam"),
    _composition("apply_nesterov_momentum", "rmsprop"),
)
"""Rules with a momentum modifier on top: no torch.optim equivalent, compared by GB/s."""


def _adam_with(**options: object) -> Callable[[list[torch.Tensor], str], Optimizer]:
    def build(params: list[torch.Tensor], engine: str) -> Optimizer:
        return RULES["adam"].factory(params, engine=engine, **options)

    return build


def _constrained_weights(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters a max-norm constraint takes by default: those of 2 to 5 dimensions."""
    weights = [p for p in params if 2 <= p.dim() <= 5]
    if not weights:
        raise ValueError("the workload has no 2-D to 5-D parameters to constrain (try --shapes issue)")
    return weights


def _norm_constrained_adam(params: list[torch.Tensor], engine: str) -> Optimizer:
    return apply_norm_constraint(RULES["adam"].factory(params, engine=engine), 1.0, params=_constrained_weights(params))


class _ClippedTorchAdam(torch.optim.Adam):
    """torch's way to Adam with ``max_grad_norm=1``: ``clip_grad_norm_``, then the step."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return super().step(closure)


class _RenormedTorchAdam(torch.optim.Adam):
    """torch's way to Adam with a max-norm of 1 on each weight's rows (``norm_constraint``'s
    default axes): the step, then ``renorm_`` of every 2-D to 5-D parameter."""

    def __init__(self, params: list[torch.Tensor], **options: Any) -> None:
        super().__init__(params, **options)
        self.weights = _constrained_weights(params)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = super().step(closure)
        with torch.no_grad():
            for weight in self.weights:
                weight.renorm_(2, 0, 1.0)
        return loss


_ADAM_MOVED = _moved(RULES["adam"])

STEP_OPTIONS: tuple[Case, ...] = (
    Case("adam[max_grad_norm]", _ADAM_MOVED, _adam_with(max_grad_norm=1.0), _ClippedTorchAdam, True),
    Case("adam[skip_nonfinite]", _ADAM_MOVED, _adam_with(skip_nonfinite=True)),
    Case("apply_norm_constraint(adam)", _ADAM_MOVED, _norm_constrained_adam, _RenormedTorchAdam, True),
)
"""Adam with each option of the step: what clipping, the non-finite check and the norm
constraint cost, read against plain adam's GB/s (the bytes counted are Adam's), and beside
torch's own way to the same step where it has one (``clip_grad_norm_``, ``renorm_``)."""

CASES: dict[str, Case] = {case.rule: case for case in (*_RULES, *COMPOSITIONS, *STEP_OPTIONS)}
"""The benchmarked rules and compositions, by name."""

ISSUE_SHAPES = "12:1024x1024,188:4096"
"""The issue's workload: 12 matrices of 1024x1024 and 188 vectors of 4096, 13,352,960 elements."""


@dataclass(frozen=True)
class Workload:
    """The parameter shapes a benchmark steps, and a short description of them."""

    shapes: tuple[tuple[int, ...], ...]
    description: str

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for shape in self.shapes)

    @classmethod
    def equal(cls, numel: int, tensors: int) -> Workload:
        """``tensors`` vectors of about equal size, ``numel`` elements in all."""
        if numel < tensors:
            raise CommandError(f"--numel {numel} is smaller than --tensors {tensors}")
        sizes = [(numel // tensors + (1 if i < numel % tensors else 0),) for i in range(tensors)]
        return cls(tuple(sizes), f"{numel:,} elements in {tensors:,} tensors of about equal size")

    @classmethod
    def parse(cls, spec: str) -> Workload:
        """``"issue"`` or comma-separated ``COUNT:SHAPE`` with dimensions joined by ``x``,
        e.g. ``"12:1024x1024,188:4096"``."""
        text = ISSUE_SHAPES if spec.strip() == "issue" else spec
        shapes: list[tuple[int, ...]] = []
        parts = []
        for entry in text.split(","):
            count_text, _, shape_text = entry.strip().partition(":")
            try:
                count = int(count_text)
                shape = tuple(int(d) for d in shape_text.split("x"))
            except ValueError:
                count, shape = 0, ()
            if count < 1 or not shape or min(shape) < 1:
                raise ValueError(
                    f"bad shape entry {entry.strip()!r}: expected COUNT:SHAPE such as 188:4096 or 12:1024x1024"
                )
            shapes += [shape] * count
            parts.append(f"{count:,} of {'x'.join(map(str, shape))}")
        workload = cls(tuple(shapes), "")
        label = "the issue's workload: " if spec.strip() == "issue" else ""
        description = f"{label}{workload.numel:,} elements in {len(shapes):,} tensors ({' + '.join(parts)})"
        return cls(workload.shapes, description)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def make_params(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, seed: int = 0
) -> list[torch.Tensor]:
    """Parameters of the given shapes, with gradients; the same values on every device."""
    generator = torch.Generator().manual_seed(seed)
    params: list[torch.Tensor] = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device))
        param.grad = (torch.randn(tuple(shape), generator=generator, dtype=dtype) * 1e-3).to(device)
        params.append(param)
    return params


def resolve_device(text: str) -> torch.device:
    """The device ``--device`` names, or a :class:`CommandError` saying why it cannot be used."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise CommandError(f"--device {text!r} is not a device: {error}") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if not callable(is_available) or not is_available():
        raise CommandError(
            f"--device {text}: no {device.type} device is available on this machine "
            f"(torch {torch.__version__}); use --device cpu"
        )
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CommandError(f"--device {text}: this machine has {count()} {device.type} device(s), numbered from 0")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that timings cover it."""
    if device.type == "cpu":
        return
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if callable(sync):
        sync(device)


def interleaved_medians(
    steppers: Mapping[str, Callable[[], object]], repeat: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each stepper over ``repeat`` rounds, after ``warmup`` rounds.

    A round calls each stepper once, in turn; each call is timed alone, the device
    synchronized before and after it.
    """
    for _ in range(warmup):
        for step in steppers.values():
            step()
    times: dict[str, list[float]] = {label: [] for label in steppers}
    for _ in range(repeat):
        for label, step in steppers.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}
