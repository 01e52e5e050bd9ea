"""The parts of ``bench`` beyond GB/s per rule: the memory ceiling, compile times, scaling.

* The ceiling: a compiled kernel that reads 4 and writes 3 flat buffers, as Adam must, with
  nothing else to do; what the machine's memory allows a one-pass Adam step at best.
* Compile times: the first ``step()`` of ``engine="compiled"`` in a fresh process with an
  empty Inductor cache (cold), then in another fresh process with that cache (warm).
* Scaling: the step time of the same elements split into few or many tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._bench_cases import CASES, Workload, interleaved_medians, make_params, synchronize

__all__ = [
    "SCALING",
    "CompileTimes",
    "ScalingPair",
    "ScalingReport",
    "ceiling_stepper",
    "compile_times",
    "run_scaling",
]

CEILING_MOVED = 7
"""Tensors the ceiling kernel reads and writes per element: p, g, m, v in; p, m, v out (as Adam)."""

COMPILED_CEILING = "compiled 4-read/3-write kernel over flat buffers"
EAGER_CEILING = "eager in-place triad over flat buffers (no compiler: unfused, below the true ceiling)"


def _triad(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    p.copy_(p + g + m + v)
    m.copy_(m + g)
    v.copy_(v + g)


def _eager_triad(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    p.add_(g).add_(m).add_(v)
    m.add_(g)
    v.add_(g)


def ceiling_stepper(numel: int, dtype: torch.dtype, device: torch.device, compiled: bool) -> Callable[[], None]:
    """One call = one pass of the ceiling kernel over four flat buffers of ``numel`` elements:
    compiled with Inductor (``compiled``), else the eager in-place triad."""
    generator = torch.Generator().manual_seed(1)
    p = torch.randn(numel, generator=generator, dtype=dtype).to(device)
    g = (torch.randn(numel, generator=generator, dtype=dtype) * 1e-3).to(device)
    m = torch.zeros(numel, dtype=dtype, device=device)
    v = torch.zeros(numel, dtype=dtype, device=device)
    kernel: Callable[..., None] = _eager_triad
    if compiled:
        kernel = torch.compile(_triad, fullgraph=True, options={"cpp.dynamic_threads": True})

    def step() -> None:
        with torch.no_grad():
            kernel(p, g, m, v)

    return step


@dataclass
class CompileTimes:
    """Seconds of the first ``step()`` (compilation included) in fresh processes."""

    rule: str
    cold_s: float  # empty Inductor cache
    warm_s: float  # the cache the cold run filled
    second_step_s: float  # the warm process's second step: no compilation
    targets_s: dict[str, float] = field(default_factory=lambda: {"cold": 10.0, "warm": 2.5})


def _child(spec_json: str) -> None:
    """In the fresh process: build the optimizer, time its first two steps, print JSON."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    params = make_params(spec["shapes"], getattr(torch, spec["dtype"]), device)
    optimizer = CASES[spec["rule"]].build(params, "compiled")
    seconds = []
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"first_step_s": seconds[0], "second_step_s": seconds[1]}))


def _first_steps(spec: Mapping[str, Any], cache_dir: str, timeout: float) -> dict[str, float]:
    source_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=cache_dir,
        PYTHONPATH=source_root if not path else os.pathsep.join((source_root, path)),
    )
    code = "import sys; from torchupdates.cli._bench_probes import _child; _child(sys.argv[1])"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the compile-time process ran past {timeout:.0f} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the compile-time process failed (exit {done.returncode}): {last}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def compile_times(
    shapes: Sequence[Sequence[int]],
    dtype: torch.dtype,
    device: torch.device,
    threads: int,
    rule: str = "adam",
    timeout: float = 300.0,
) -> CompileTimes:
    """Time ``rule``'s first compiled step in two fresh processes sharing a new, empty
    ``TORCHINDUCTOR_CACHE_DIR``: the first compiles from nothing, the second from the cache.

    Raises RuntimeError (saying why) when a process fails or runs past ``timeout`` seconds.
    """
    spec = {
        "shapes": [list(shape) for shape in shapes],
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": threads,
        "rule": rule,
    }
    with tempfile.TemporaryDirectory(prefix="torchupdates-inductor-") as cache_dir:
        cold = _first_steps(spec, cache_dir, timeout)
        warm = _first_steps(spec, cache_dir, timeout)
    return CompileTimes(rule, cold["first_step_s"], warm["first_step_s"], warm["second_step_s"])


@dataclass(frozen=True)
class ScalingPair:
    """Two layouts of the same elements, ``(tensors, numel)`` each (``numel`` None: the
    workload's), and the target for the ratio of their step times (``many`` / ``few``)."""

    few: tuple[int, int | None]
    many: tuple[int, int | None]
    target: float


SCALING: tuple[ScalingPair, ...] = (
    ScalingPair(few=(20, None), many=(2000, None), target=1.2),
    ScalingPair(few=(1, 1_000_000), many=(10_000, 1_000_000), target=2.0),
)
"""The issue's scaling checks: the workload's elements in 20 vs 2,000 tensors (within 20%),
and 1M elements in one tensor vs 10,000 tensors of 100 (at most twice the time)."""


@dataclass
class ScalingReport:
    """Median step seconds of each implementation on each layout, and the pairs' ratios."""

    layouts: list[dict[str, Any]] = field(default_factory=list)  # tensors, numel, seconds by implementation
    ratios: list[dict[str, Any]] = field(default_factory=list)  # many, few, target, ratio by implementation


def _layout_label(tensors: int, numel: int) -> str:
    return f"{numel:,} elements in {tensors:,} tensor{'s' if tensors > 1 else ''}"


def run_scaling(
    implementations: Mapping[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]],
    numel: int,
    dtype: torch.dtype,
    device: torch.device,
    repeat: int,
    warmup: int,
    pairs: Sequence[ScalingPair] | None = None,
) -> ScalingReport:
    """Step every implementation on both layouts of each pair of ``pairs`` (default:
    :data:`SCALING`), a pair's layouts interleaved in one set of rounds (so that the machine's
    drift hits its few and its many tensors alike, and no other pair's steps run between
    them), and report the median step times and each pair's ratio ``many / few``."""
    pairs = SCALING if pairs is None else pairs
    report = ScalingReport()
    for pair in pairs:
        few = (pair.few[0], numel if pair.few[1] is None else pair.few[1])
        many = (pair.many[0], numel if pair.many[1] is None else pair.many[1])
        steppers: dict[str, Callable[[], object]] = {}
        for key in (few, many):
            params = make_params(Workload.equal(key[1], key[0]).shapes, dtype, device)
            steppers.update({f"{label} @ {key}": build(params).step for label, build in implementations.items()})
        medians = interleaved_medians(steppers, repeat, warmup, device)
        del steppers
        seconds = {key: {label: medians[f"{label} @ {key}"] for label in implementations} for key in (few, many)}
        for key in (few, many):
            label = _layout_label(*key)
            if all(layout["label"] != label for layout in report.layouts):
                report.layouts.append({"tensors": key[0], "numel": key[1], "label": label, "seconds": seconds[key]})
        ratio = {label: seconds[many][label] / seconds[few][label] for label in implementations}
        report.ratios.append(
            {"many": _layout_label(*many), "few": _layout_label(*few), "target": pair.target, "ratio": ratio}
        )
    return report
