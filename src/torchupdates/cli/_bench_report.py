"""What ``bench`` reports: the records of a run, the text tables and the JSON document."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any

import torch

from ._bench_probes import CompileTimes, ScalingReport
from ._report import format_rows

__all__ = [
    "TORCH_COLUMNS",
    "BenchReport",
    "BenchResult",
    "Ceiling",
    "format_ratios",
    "format_report",
    "format_results",
    "report_document",
]

TORCH_COLUMNS = ("torch single", "torch foreach", "torch fused")
YARDSTICK = "torch.optim.Adam(fused=True)"


@dataclass
class BenchResult:
    """One rule's measurements: GB/s and state bytes per element by implementation, and
    each of our engines' GB/s over torch foreach's for the rule and over torch fused Adam's.
    ``fused_adam_gb_per_s``: torch fused Adam on the same values, stepped in the same rounds
    as this rule's implementations (the yardstick of its row)."""

    rule: str
    bytes_per_step: int
    fused_adam_gb_per_s: float | None = None
    gb_per_s: dict[str, float] = field(default_factory=dict)
    state_bytes_per_element: dict[str, float] = field(default_factory=dict)
    vs_torch_foreach: dict[str, float] = field(default_factory=dict)
    vs_torch_fused_adam: dict[str, float] = field(default_factory=dict)


@dataclass
class Ceiling:
    """The memory ceiling kernel's GB/s (Adam's 7 tensors per element), measured in the
    same rounds as Adam, and Adam's GB/s by implementation over it."""

    kernel: str
    bytes_per_element: int
    gb_per_s: float
    adam_gb_per_s: dict[str, float] = field(default_factory=dict)
    adam_vs_ceiling: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    """Everything one ``bench`` run measured; ``notes`` say what could not be measured and why."""

    workload: str
    numel: int
    tensors: int
    device: str
    dtype: str
    repeat: int
    warmup: int
    results: list[BenchResult] = field(default_factory=list)
    torch_fused_adam_gb_per_s: float | None = None
    ceiling: Ceiling | None = None
    compile_times: CompileTimes | None = None
    scaling: ScalingReport | None = None
    notes: list[str] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)  # 1-minute, at the start and at the end
    cpu_count: int | None = field(default_factory=os.cpu_count)


def _rate(values: dict[str, float], key: str, form: str = "{:.1f}") -> str:
    return form.format(values[key]) if key in values else "-"


def format_results(results: Sequence[BenchResult], engines: Sequence[str], numel: int) -> str:
    """The GB/s table: torch.optim's implementations, our engines, and state bytes per element."""
    columns = [*TORCH_COLUMNS, *engines]
    header = ["rule (GB/s)", "moved B/elem", *columns, "state B/elem"]
    rows = []
    for r in results:
        ours = next((r.state_bytes_per_element[e] for e in engines if e in r.state_bytes_per_element), None)
        theirs = r.state_bytes_per_element.get("torch foreach")
        state = "-" if ours is None else f"{ours:.0f}" + (f" (torch {theirs:.0f})" if theirs is not None else "")
        rows.append([r.rule, f"{r.bytes_per_step // numel}", *(_rate(r.gb_per_s, c) for c in columns), state])
    return format_rows(header, rows)


def format_ratios(results: Sequence[BenchResult], engines: Sequence[str]) -> str:
    """The ratio table: each engine's GB/s over torch foreach's (same rule) and torch fused Adam's."""
    header = ["rule (GB/s ratios)", *(f"{e} / torch foreach" for e in engines), *(f"{e} / fused Adam" for e in engines)]
    rows = [
        [
            r.rule,
            *(_rate(r.vs_torch_foreach, e, "{:.2f}x") for e in engines),
            *(_rate(r.vs_torch_fused_adam, e, "{:.2f}x") for e in engines),
        ]
        for r in results
    ]
    return format_rows(header, rows)


def _format_ceiling(ceiling: Ceiling) -> str:
    rows = [[f"ceiling: {ceiling.kernel}", f"{ceiling.gb_per_s:.1f}", "1.00x"]]
    for label, rate in ceiling.adam_gb_per_s.items():
        name = YARDSTICK if label == "torch fused" else f'adam, engine="{label}"'
        rows.append([name, f"{rate:.1f}", f"{ceiling.adam_vs_ceiling[label]:.2f}x"])
    header = f"memory ceiling ({ceiling.bytes_per_element} B/elem moved, as Adam)"
    return format_rows([header, "GB/s", "/ ceiling"], rows)


def _format_compile_times(times: CompileTimes) -> str:
    rows = [
        ["cold (empty Inductor cache)", f"{times.cold_s:.1f}", f"<= {times.targets_s['cold']:g}"],
        ["warm (the cold run's cache)", f"{times.warm_s:.1f}", f"<= {times.targets_s['warm']:g}"],
        ["then one step, for comparison", f"{times.second_step_s:.3f}", ""],
    ]
    header = [f'first step() of {times.rule}, engine="compiled", in a fresh process', "seconds", "target"]
    return format_rows(header, rows)


def _format_scaling(scaling: ScalingReport) -> str:
    labels = list(scaling.layouts[0]["seconds"]) if scaling.layouts else []
    by_label = {layout["label"]: layout for layout in scaling.layouts}
    rows = []
    for pair in scaling.ratios:
        for key in (pair["few"], pair["many"]):
            rows.append([key, *(f"{1e3 * by_label[key]['seconds'][label]:.2f}" for label in labels)])
        rows.append(
            [f"  many / few (target <= {pair['target']:.2f}x)", *(f"{pair['ratio'][label]:.2f}x" for label in labels)]
        )
    return format_rows(["step time in ms (median)", *labels], rows)


def format_report(report: BenchReport, engines: Sequence[str], threads: int | None = None) -> str:
    """The whole report as text: the GB/s table, the ratio table, and the other sections."""
    threads_text = "" if threads is None else f", {threads} thread{'s' if threads > 1 else ''}"
    load = "/".join(f"{value:.1f}" for value in report.load_average)
    load_text = f"; load average {load} at start/end on {report.cpu_count} CPUs" if load else ""
    parts = [
        f"{report.workload}; {report.dtype} on {report.device}, torch {torch.__version__}{threads_text}{load_text}",
        f"GB/s = bytes a step must move / median step time ({report.repeat} steps after {report.warmup} warm-up "
        "steps, every implementation on tensors of the same values, one step of each in turn)",
        "",
        format_results(report.results, engines, report.numel),
        "",
        format_ratios(report.results, engines),
    ]
    yardsticks = [r.fused_adam_gb_per_s for r in report.results if r.fused_adam_gb_per_s is not None]
    if yardsticks:
        parts.append(
            f"fused Adam = {YARDSTICK} on the same values, stepped in the same rounds as each row: "
            f"{min(yardsticks):.1f} to {max(yardsticks):.1f} GB/s"
        )
    elif report.torch_fused_adam_gb_per_s is not None:
        parts.append(f"fused Adam = {YARDSTICK} on the same values: {report.torch_fused_adam_gb_per_s:.1f} GB/s")
    if report.ceiling is not None:
        parts += ["", _format_ceiling(report.ceiling)]
    if report.scaling is not None:
        parts += ["", _format_scaling(report.scaling)]
    if report.compile_times is not None:
        parts += ["", _format_compile_times(report.compile_times)]
    if report.notes:
        parts += ["", *(f"note: {note}" for note in report.notes)]
    return "\n".join(parts)


def report_document(report: BenchReport, config: dict[str, Any], shapes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The JSON-ready record of a run: the config, the workload's shapes, every section."""
    document = {"config": config, "torch": torch.__version__, **asdict(report)}
    document["shapes"] = [[len(list(run)), list(shape)] for shape, run in groupby(map(tuple, shapes))]
    return document
