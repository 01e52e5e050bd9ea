"""``python -m torchupdates bench``: time one optimizer step of each rule beside torch.optim.

Speed is reported as effective bandwidth: the bytes a rule must read and write in a step
(each parameter, gradient and state element once) divided by the median step time, for
torchupdates' engines and, in the same run on the same tensors, for the matching
torch.optim optimizer (foreach, and fused where torch has it). Memory is reported as the
optimizer state kept per parameter element, in bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import rules
from ._command import Command, CommandError, positive_float, positive_int, torch_threads
from ._report import format_rows
from .engines import ENGINES
from .optimizer import Optimizer

__all__ = ["CASES", "COMMAND", "BenchResult", "run_bench"]

TorchFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class Case:
    """A rule, how many tensors a step must move per element, and torch.optim's equivalent."""

    rule: str
    moved: int  # reads + writes of parameter, gradient and state, per element
    build: Callable[..., Optimizer]
    torch_optim: TorchFactory | None
    torch_fused: bool  # whether torch.optim's version has fused=True


CASES: dict[str, Case] = {
    case.rule: case
    for case in (
        Case("sgd", 3, lambda p, e: rules.sgd(p, 0.01, engine=e), lambda p, **k: torch.optim.SGD(p, 0.01, **k), True),
        Case(
            "momentum",
            5,
            lambda p, e: rules.momentum(p, 0.01, engine=e),
            lambda p, **k: torch.optim.SGD(p, 0.01, momentum=0.9, **k),
            True,
        ),
        Case(
            "nesterov_momentum",
            5,
            lambda p, e: rules.nesterov_momentum(p, 0.01, engine=e),
            lambda p, **k: torch.optim.SGD(p, 0.01, momentum=0.9, nesterov=True, **k),
            True,
        ),
        Case(
            "adagrad",
            5,
            lambda p, e: rules.adagrad(p, 0.01, engine=e),
            lambda p, **k: torch.optim.Adagrad(p, 0.01, **k),
            True,
        ),
        Case(
            "rmsprop",
            5,
            lambda p, e: rules.rmsprop(p, 0.01, engine=e),
            lambda p, **k: torch.optim.RMSprop(p, 0.01, **k),
            False,
        ),
        Case(
            "adadelta", 7, lambda p, e: rules.adadelta(p, engine=e), lambda p, **k: torch.optim.Adadelta(p, **k), False
        ),
        Case("adam", 7, lambda p, e: rules.adam(p, engine=e), lambda p, **k: torch.optim.Adam(p, **k), True),
        Case("adamax", 7, lambda p, e: rules.adamax(p, engine=e), lambda p, **k: torch.optim.Adamax(p, **k), False),
        Case(
            "amsgrad",
            9,
            lambda p, e: rules.amsgrad(p, engine=e),
            lambda p, **k: torch.optim.Adam(p, amsgrad=True, **k),
            True,
        ),
    )
}
"""The benchmarked rules, by name."""


@dataclass
class BenchResult:
    """One rule's measurements: GB/s and state bytes per element, by implementation."""

    rule: str
    bytes_per_step: int
    gb_per_s: dict[str, float] = field(default_factory=dict)
    state_bytes_per_element: dict[str, float] = field(default_factory=dict)


def make_params(numel: int, tensors: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """``tensors`` parameters of about equal size, ``numel`` elements in all, with gradients."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    params: list[torch.Tensor] = [torch.nn.Parameter(torch.randn(n, generator=generator, dtype=dtype)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=dtype) * 1e-3
    return params


def median_step_seconds(optimizer: torch.optim.Optimizer, repeat: int) -> float:
    """Median seconds of ``optimizer.step()`` over ``repeat`` steps, after two warm-up steps."""
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _state_bytes(optimizer: torch.optim.Optimizer, numel: int) -> float:
    total = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return total / numel


def _implementations(case: Case, engines: Sequence[str]) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    built: dict[str, Callable[[list[torch.Tensor]], Any]] = {}
    if case.torch_optim is not None:
        torch_optim = case.torch_optim
        built["torch foreach"] = lambda p: torch_optim(p, foreach=True)
        if case.torch_fused:
            built["torch fused"] = lambda p: torch_optim(p, fused=True)
    for engine in engines:
        built[engine] = _ours(case, engine)
    return built


def _ours(case: Case, engine: str) -> Callable[[list[torch.Tensor]], Optimizer]:
    return lambda params: case.build(params, engine)


def run_bench(
    rule_names: Sequence[str], engines: Sequence[str], numel: int, tensors: int, repeat: int, dtype: torch.dtype
) -> list[BenchResult]:
    """Measure every rule with every engine and with torch.optim, on the same tensors."""
    params = make_params(numel, tensors, dtype)
    itemsize = params[0].element_size()
    results = []
    for name in rule_names:
        case = CASES[name]
        result = BenchResult(name, case.moved * itemsize * numel)
        for label, build in _implementations(case, engines).items():
            try:
                optimizer = build(params)
            except (RuntimeError, ValueError, TypeError):  # e.g. no fused kernel for this device or dtype
                continue
            seconds = median_step_seconds(optimizer, repeat)
            result.gb_per_s[label] = result.bytes_per_step / seconds / 1e9
            result.state_bytes_per_element[label] = _state_bytes(optimizer, numel)
        results.append(result)
    return results


def format_results(results: Sequence[BenchResult], engines: Sequence[str]) -> str:
    """The table: GB/s per implementation, our engines' ratio to torch foreach, state bytes."""
    columns = ["torch foreach", "torch fused", *engines]
    header = ["rule", *(f"{c} GB/s" for c in columns), *(f"{e} / torch" for e in engines), "state B/elem"]
    rows = []
    for r in results:
        speed = [f"{r.gb_per_s[c]:.1f}" if c in r.gb_per_s else "-" for c in columns]
        base = r.gb_per_s.get("torch foreach")
        ratios = [f"{r.gb_per_s[e] / base:.2f}x" if base and e in r.gb_per_s else "-" for e in engines]
        ours = r.state_bytes_per_element.get(engines[0], float("nan"))
        theirs = r.state_bytes_per_element.get("torch foreach")
        state = f"{ours:.0f}" + (f" (torch {theirs:.0f})" if theirs is not None else "")
        rows.append([r.rule, *speed, *ratios, state])
    return format_rows(header, rows)


def _names_from(choices: Sequence[str], kind: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind}(s) {unknown or [text]}; choose from {', '.join(choices)}")
        return names

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``bench`` to ``parser``."""
    add = parser.add_argument
    add("--numel", type=positive_float, default=4e6, metavar="N", help="parameter elements in all (default: 4e6)")
    add("--tensors", type=positive_int, default=200, metavar="N", help="number of parameter tensors (default: 200)")
    add("--repeat", type=positive_int, default=10, metavar="N", help="timed steps per measurement (default: 10)")
    add(
        "--rules",
        type=_names_from(list(CASES), "rule"),
        default=list(CASES),
        metavar="RULES",
        help="comma-separated rules (default: all)",
    )
    add(
        "--engines",
        type=_names_from(list(ENGINES), "engine"),
        default=["foreach", "reference"],
        metavar="ENGINES",
        help="comma-separated torchupdates engines (default: foreach,reference)",
    )
    add("--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype (default: float32)")
    add("--threads", type=positive_int, default=torch.get_num_threads(), metavar="N", help="torch threads")
    add("--json", type=Path, default=None, metavar="PATH", help="also write the measurements as JSON")


def _run(args: argparse.Namespace) -> int:
    numel = int(args.numel)
    if numel < args.tensors:
        raise CommandError(f"--numel {numel} is smaller than --tensors {args.tensors}")
    dtype = getattr(torch, args.dtype)
    with torch_threads(args.threads):
        print(
            f"{numel:,} {args.dtype} elements in {args.tensors} tensors, torch {torch.__version__}, "
            f"{args.threads} threads; GB/s = bytes a step must move / median step time"
        )
        results = run_bench(args.rules, args.engines, numel, args.tensors, args.repeat, dtype)
    print(format_results(results, args.engines))
    if args.json is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("command", "command_name", "json")}
        document = {"config": config, "torch": torch.__version__, "results": [asdict(r) for r in results]}
        try:
            args.json.write_text(json.dumps(document, indent=2) + "\n")
        except OSError as error:
            raise CommandError(f"cannot write {args.json}: {error.strerror or error}") from None
        print(f"wrote {args.json}")
    return 0


COMMAND = Command(
    name="bench",
    summary="time one step of each rule beside torch.optim (effective GB/s, state memory)",
    description=__doc__.splitlines()[0].split(": ", 1)[1] if __doc__ else "",
    configure=configure,
    run=_run,
    epilog="example:\n  python -m torchupdates bench --numel 13.4e6 --tensors 200 --rules adam,sgd --json bench.json",
)
"""The ``bench`` subcommand, listed by :mod:`torchupdates.cli`."""
