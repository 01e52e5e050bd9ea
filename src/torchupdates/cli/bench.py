"""``python -m torchupdates bench``: time one optimizer step of each rule beside torch.optim.

Speed is reported as effective bandwidth: the bytes a rule must read and write in a step
(each parameter, gradient and state element once) divided by the median step time, for
torchupdates' engines and, in the same run on tensors of the same values, for the matching
torch.optim optimizer (single-tensor, foreach, and fused where torch has it). torch's
optimizers share one set of parameters; each of our engines steps a copy of its own, since
an engine may keep them in flat buffers of its own. Ratios compare
each engine with torch's foreach step of the same rule and with ``torch.optim.Adam(fused=True)``.
The run also measures the machine's memory ceiling (a kernel that only moves Adam's bytes),
the compiled engine's compile times, and how step time scales with the number of tensors.
Memory is reported as the optimizer state kept per parameter element, in bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..engines import ENGINES
from ..engines.compiled import CompilerMissingError, require_compiler
from ._bench_cases import CASES, ISSUE_SHAPES, Case, Workload, interleaved_medians, make_params, resolve_device
from ._bench_probes import CEILING_MOVED, COMPILED_CEILING, EAGER_CEILING, ceiling_stepper, compile_times, run_scaling
from ._bench_report import TORCH_COLUMNS, BenchReport, BenchResult, Ceiling, format_report, report_document
from ._command import Command, CommandError, positive_float, positive_int, torch_threads
from ._report import write_json

__all__ = ["CASES", "COMMAND", "BenchReport", "BenchResult", "Ceiling", "format_report", "run_bench"]

COMPILED_WARMUP = 3  # warm-up steps at least, for the compiled engine: compilation is never timed
_YARDSTICK = "fused Adam, the yardstick"  # stepped in every row's rounds (in adam's, its "torch fused")


def _load() -> list[float]:
    try:
        return [round(os.getloadavg()[0], 2)]
    except (AttributeError, OSError):  # not on every platform
        return []


def _busy_note(load_average: Sequence[float], device: torch.device) -> str | None:
    """A warning when other processes keep the cores that the torch threads need."""
    cpus = os.cpu_count()
    threads = torch.get_num_threads()
    if device.type != "cpu" or not load_average or cpus is None or load_average[0] <= cpus - threads + 0.5:
        return None
    return (
        f"the load average was {load_average[0]:.1f} on {cpus} CPUs before the run: other processes hold cores "
        f"that the {threads} torch threads need, so parallel loops wait for descheduled threads and times are "
        "erratic, worst for implementations with many parallel loops per step (torch foreach and single-tensor); "
        "rerun on a quiet machine, with fewer --threads, or with OMP_WAIT_POLICY=PASSIVE set"
    )


def _state_bytes(optimizer: torch.optim.Optimizer, numel: int) -> float:
    total = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
    return total / numel


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _compiler_problem(device: torch.device) -> str | None:
    """Why ``engine="compiled"`` (and the compiled ceiling) cannot run here, or None."""
    try:
        require_compiler({device.type})
    except CompilerMissingError as error:
        return str(error)
    return None


def _builders(case: Case, engines: Sequence[str], torch_labels: Sequence[str]) -> dict[str, Callable[..., Any]]:
    built: dict[str, Callable[..., Any]] = {
        label: factory for label, factory in case.torch_variants().items() if label in torch_labels
    }
    for engine in engines:
        built[engine] = _ours(case, engine)
    return built


def _ours(case: Case, engine: str) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: case.build(params, engine)


def _measure(
    case: Case,
    builders: dict[str, Callable[..., Any]],
    params: list[torch.Tensor],
    repeat: int,
    warmup: int,
    device: torch.device,
    notes: list[str],
    ceiling: tuple[str, Callable[[], None]] | None = None,
) -> tuple[BenchResult, float | None]:
    """Time every implementation of ``case``, torch's fused Adam (the yardstick) and the
    ceiling kernel, if given, in the same rounds."""
    numel = sum(p.numel() for p in params)
    result = BenchResult(case.rule, case.moved * params[0].element_size() * numel)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if case.rule != "adam" or "torch fused" not in builders:
        builders = {**builders, _YARDSTICK: lambda p: torch.optim.Adam(p, fused=True)}
    failed: dict[str, list[str]] = {}  # why -> the implementations it stopped
    for label, build in builders.items():
        try:
            # Engines that keep parameters in flat buffers of their own (the compiled engine;
            # the foreach engine on a GPU) would take shared ones from each other every step.
            optimizer = build(_copies(params) if label in ENGINES else params)
            optimizer.step()  # the first warm-up step; the compiled engine compiles here
        except Exception as error:  # e.g. no fused kernel for this device or dtype
            failed.setdefault(_first_line(error), []).append(label)
            continue
        optimizers[label] = optimizer
    notes += [f"{case.rule} with {', '.join(labels)}: not measured ({why})" for why, labels in failed.items()]
    steppers: dict[str, Callable[[], object]] = {label: opt.step for label, opt in optimizers.items()}
    if ceiling is not None:
        steppers["ceiling"] = ceiling[1]
    seconds = interleaved_medians(steppers, repeat, warmup - 1, device) if steppers else {}
    adam_bytes = CASES["adam"].moved * params[0].element_size() * numel
    for label, optimizer in optimizers.items():
        if label == _YARDSTICK:
            continue
        result.gb_per_s[label] = result.bytes_per_step / seconds[label] / 1e9
        result.state_bytes_per_element[label] = _state_bytes(optimizer, numel)
    yardstick = _YARDSTICK if _YARDSTICK in seconds else "torch fused" if case.rule == "adam" else None
    if yardstick in seconds:
        result.fused_adam_gb_per_s = adam_bytes / seconds[yardstick] / 1e9
    ceiling_gb_per_s = None
    if ceiling is not None:
        ceiling_gb_per_s = CEILING_MOVED * params[0].element_size() * numel / seconds["ceiling"] / 1e9
    return result, ceiling_gb_per_s


def _copies(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New parameters with the values and gradients of ``params``."""
    copies: list[torch.Tensor] = []
    for param in params:
        copy = torch.nn.Parameter(param.detach().clone())
        copy.grad = None if param.grad is None else param.grad.clone()
        copies.append(copy)
    return copies


def _ceiling(numel: int, dtype: torch.dtype, device: torch.device, notes: list[str]) -> tuple[str, Callable[[], None]]:
    """The ceiling kernel, compiled and run once (compilation is not timed), with its label."""
    problem = _compiler_problem(device)
    if problem is None:
        try:
            step = ceiling_stepper(numel, dtype, device, compiled=True)
            step()
            return COMPILED_CEILING, step
        except Exception as error:
            problem = _first_line(error)
    notes.append(f"ceiling: the eager triad instead of the compiled kernel ({problem})")
    step = ceiling_stepper(numel, dtype, device, compiled=False)
    step()
    return EAGER_CEILING, step


def run_bench(
    rule_names: Sequence[str],
    engines: Sequence[str],
    workload: Workload,
    repeat: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    warmup: int = COMPILED_WARMUP,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure every case with every engine and with torch.optim, on tensors of the same values, and
    the memory ceiling in the same rounds as Adam (measured for that even when ``adam`` is
    not among ``rule_names``, with torch fused and our engines only, to give the yardstick)."""
    device = torch.device(device)
    problem = _compiler_problem(device) if "compiled" in engines else None
    usable = [e for e in engines if not (e == "compiled" and problem is not None)]
    warmup = max(warmup, COMPILED_WARMUP) if "compiled" in usable else warmup
    params = make_params(workload.shapes, dtype, device)
    report = BenchReport(
        workload.description,
        workload.numel,
        len(params),
        str(device),
        str(dtype).removeprefix("torch."),
        repeat,
        warmup,
        load_average=_load(),
    )
    if problem is not None:
        report.notes.append(f'compiled: "-" because {problem}')
    busy = _busy_note(report.load_average, device)
    if busy is not None:
        report.notes.append(busy)
    adam_result: BenchResult | None = None
    for name in [*rule_names, *([] if "adam" in rule_names else ["adam"])]:
        if progress is not None:
            progress(name if name in rule_names else "adam (for the yardstick and the ceiling)")
        case = CASES[name]
        shown = name in rule_names
        builders = _builders(case, usable, TORCH_COLUMNS if shown else ("torch fused",))
        ceiling = _ceiling(workload.numel, dtype, device, report.notes) if name == "adam" else None
        result, ceiling_gb_per_s = _measure(case, builders, params, repeat, warmup, device, report.notes, ceiling)
        if shown:
            report.results.append(result)
        if ceiling is not None and ceiling_gb_per_s is not None:
            adam_result = result
            report.ceiling = Ceiling(ceiling[0], CEILING_MOVED * params[0].element_size(), ceiling_gb_per_s)
        del builders, ceiling
        gc.collect()
    report.torch_fused_adam_gb_per_s = None if adam_result is None else adam_result.gb_per_s.get("torch fused")
    yardstick = report.torch_fused_adam_gb_per_s
    for result in report.results:
        base = result.gb_per_s.get("torch foreach")
        same_rounds = result.fused_adam_gb_per_s or yardstick
        for engine in usable:
            if engine in result.gb_per_s:
                if base:
                    result.vs_torch_foreach[engine] = result.gb_per_s[engine] / base
                if same_rounds:
                    result.vs_torch_fused_adam[engine] = result.gb_per_s[engine] / same_rounds
    if report.ceiling is not None and adam_result is not None:
        for label in ("torch fused", *usable):
            if label in adam_result.gb_per_s:
                report.ceiling.adam_gb_per_s[label] = adam_result.gb_per_s[label]
                report.ceiling.adam_vs_ceiling[label] = adam_result.gb_per_s[label] / report.ceiling.gb_per_s
    return report


def add_compile_times(report: BenchReport, workload: Workload, dtype: torch.dtype, threads: int) -> None:
    """Measure the compiled engine's cold and warm first step of adam into ``report``."""
    device = torch.device(report.device)
    problem = _compiler_problem(device)
    if problem is not None:
        report.notes.append(f"compile times: not measured ({problem})")
        return
    try:
        report.compile_times = compile_times(workload.shapes, dtype, device, threads)
    except RuntimeError as error:
        report.notes.append(f"compile times: not measured ({error})")


def add_scaling(report: BenchReport, engines: Sequence[str], dtype: torch.dtype) -> None:
    """Measure step times of compiled adam and torch fused Adam on few vs many tensors into ``report``."""
    device = torch.device(report.device)
    implementations: dict[str, Callable[..., Any]] = {}
    if "compiled" in engines and _compiler_problem(device) is None:
        implementations["compiled adam"] = _ours(CASES["adam"], "compiled")
    elif "compiled" not in engines:
        report.notes.append("scaling: compiled adam not measured (--engines has no compiled)")
    implementations["torch fused Adam"] = lambda p: torch.optim.Adam(p, fused=True)
    warmup = max(report.warmup, COMPILED_WARMUP)
    try:
        report.scaling = run_scaling(implementations, report.numel, dtype, device, report.repeat, warmup)
    except (RuntimeError, ValueError, TypeError, CommandError) as error:
        report.notes.append(f"scaling: not measured ({_first_line(error)})")


def _names_from(choices: Sequence[str], kind: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {kind}(s) {unknown or [text]}; choose from {', '.join(choices)}")
        return names

    return parse


def _workload(text: str) -> Workload:
    try:
        return Workload.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``bench`` to ``parser``."""
    add = parser.add_argument
    add("--numel", type=positive_float, default=None, metavar="N", help="parameter elements in all (default: 4e6)")
    add("--tensors", type=positive_int, default=None, metavar="N", help="number of parameter tensors (default: 200)")
    add(
        "--shapes",
        type=_workload,
        default=None,
        metavar="SPEC",
        help=f"parameter shapes instead of --numel/--tensors: 'issue' (= {ISSUE_SHAPES}, 13.4M elements) "
        "or COUNT:SHAPE entries, dimensions joined by x",
    )
    add("--repeat", type=positive_int, default=10, metavar="N", help="timed steps per measurement (default: 10)")
    add(
        "--warmup",
        type=positive_int,
        default=COMPILED_WARMUP,
        metavar="N",
        help=f"untimed steps first (default and minimum with the compiled engine: {COMPILED_WARMUP})",
    )
    add(
        "--rules",
        type=_names_from(list(CASES), "rule"),
        default=list(CASES),
        metavar="RULES",
        help="comma-separated rules and compositions (default: all)",
    )
    add(
        "--engines",
        type=_names_from(list(ENGINES), "engine"),
        default=["foreach", "compiled"],
        metavar="ENGINES",
        help="comma-separated torchupdates engines (default: foreach,compiled; reference when asked)",
    )
    add("--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype (default: float32)")
    add("--device", default="cpu", help="where the tensors live: cpu (default), cuda, cuda:1, ...")
    add("--threads", type=positive_int, default=torch.get_num_threads(), metavar="N", help="torch threads")
    add(
        "--compile-times",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time compiled adam's first step, cold and warm cache, in fresh processes (about 15 s; default: on)",
    )
    add(
        "--scaling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time adam on 20 vs 2,000 tensors and 1 vs 10,000 tensors of the same elements (default: on)",
    )
    add("--json", type=Path, default=None, metavar="PATH", help="also write the measurements as JSON")


def _workload_of(args: argparse.Namespace) -> Workload:
    if args.shapes is not None:
        if args.numel is not None or args.tensors is not None:
            raise CommandError("--shapes sets the sizes: leave out --numel and --tensors")
        workload: Workload = args.shapes
        return workload
    return Workload.equal(int(args.numel or 4e6), args.tensors or 200)


def _progress(name: str) -> None:
    print(f"measuring {name} ...", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    workload = _workload_of(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    with torch_threads(args.threads):
        report = run_bench(args.rules, args.engines, workload, args.repeat, dtype, device, args.warmup, _progress)
        if args.scaling:
            _progress("scaling")
            add_scaling(report, args.engines, dtype)
        if args.compile_times and "compiled" in args.engines:
            _progress("compile times (two fresh processes)")
            add_compile_times(report, workload, dtype, args.threads)
        report.load_average += _load()
    print(format_report(report, args.engines, args.threads))
    if args.json is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("command", "command_name", "json", "shapes")}
        config.update(shapes=None if args.shapes is None else workload.description, numel=report.numel)
        config.update(tensors=report.tensors, warmup=report.warmup)
        try:
            write_json(report_document(report, config, workload.shapes), args.json)
        except OSError as error:
            raise CommandError(f"cannot write {args.json}: {error.strerror or error}") from None
        print(f"wrote {args.json}")
    return 0


COMMAND = Command(
    name="bench",
    summary="time one step of each rule beside torch.optim (effective GB/s, memory ceiling, compile times)",
    description=__doc__.splitlines()[0].split(": ", 1)[1] if __doc__ else "",
    configure=configure,
    run=_run,
    epilog="example (the issue's workload, every section): python -m torchupdates bench --shapes issue --json b.json",
)
"""The ``bench`` subcommand, listed by :mod:`torchupdates.cli`."""
