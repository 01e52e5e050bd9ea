"""The eager ``foreach`` engine beside torch.optim's foreach (and fused) step, same run.

Workload (default): float32, 13.4M parameters in 200 tensors (12 of 1024x1024 and 188 of 4096),
gradients fixed. Every implementation gets its own copy of the parameters and gradients; their
steps are interleaved (one step of each in turn) so that the machine's drift hits all of them
alike, and each one's median step time over ``--repeat`` rounds is reported, after
``--warmup`` rounds. Each step comes right after a multi-threaded torch operation, as a step
comes after a backward pass (torch's OpenMP threads are awake and spinning then; turn this off
with ``--no-after-parallel-work``). Ratios compare medians of the same run; the last column
compares the fastest steps instead (less sensitive to other processes on a shared machine).
Example::

    python benchmarks/bench_eager.py --repeat 20 --rules adam,momentum
    python benchmarks/bench_eager.py --profile adam     # torch.profiler table of our step
    git worktree add /tmp/before <commit> && python benchmarks/bench_eager.py --before /tmp/before/src
    python benchmarks/bench_eager.py --engines foreach,compiled --big 0 --small 6 --small-numel 1667  # a small model
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import torchupdates as updates

TorchFactory = Callable[[list[torch.Tensor], dict[str, Any]], torch.optim.Optimizer]
OursFactory = Callable[[Any, list[torch.Tensor], str], torch.optim.Optimizer]  # (package, params, engine)

# rule -> (ours, torch.optim's equivalent, whether torch has fused=True for it)
RULES: dict[str, tuple[OursFactory, TorchFactory, bool]] = {
    "sgd": (lambda u, p, e: u.sgd(p, 0.01, engine=e), lambda p, k: torch.optim.SGD(p, 0.01, **k), True),
    "momentum": (
        lambda u, p, e: u.momentum(p, 0.01, engine=e),
        lambda p, k: torch.optim.SGD(p, 0.01, momentum=0.9, **k),
        True,
    ),
    "nesterov_momentum": (
        lambda u, p, e: u.nesterov_momentum(p, 0.01, engine=e),
        lambda p, k: torch.optim.SGD(p, 0.01, momentum=0.9, nesterov=True, **k),
        True,
    ),
    "adagrad": (lambda u, p, e: u.adagrad(p, 0.01, engine=e), lambda p, k: torch.optim.Adagrad(p, 0.01, **k), True),
    "rmsprop": (lambda u, p, e: u.rmsprop(p, 0.01, engine=e), lambda p, k: torch.optim.RMSprop(p, 0.01, **k), False),
    "adadelta": (lambda u, p, e: u.adadelta(p, engine=e), lambda p, k: torch.optim.Adadelta(p, **k), False),
    "adam": (lambda u, p, e: u.adam(p, engine=e), lambda p, k: torch.optim.Adam(p, **k), True),
    "adamax": (lambda u, p, e: u.adamax(p, engine=e), lambda p, k: torch.optim.Adamax(p, **k), False),
    "amsgrad": (
        lambda u, p, e: u.amsgrad(p, engine=e),
        lambda p, k: torch.optim.Adam(p, amsgrad=True, **k),
        True,
    ),
}


def load_before(source: str) -> Any:
    """The ``torchupdates`` package of another checkout (its ``src`` folder), imported as
    ``torchupdates_before`` beside this one."""
    root = Path(source) / "torchupdates"
    spec = importlib.util.spec_from_file_location(
        "torchupdates_before", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no torchupdates package in {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchupdates_before"] = module
    spec.loader.exec_module(module)
    return module


def make_params(big: int, small: int, big_shape: tuple[int, ...], small_numel: int) -> list[torch.Tensor]:
    """``big`` tensors of ``big_shape`` and ``small`` of ``small_numel``, with fixed gradients."""
    generator = torch.Generator().manual_seed(0)
    shapes = [big_shape] * big + [(small_numel,)] * small
    params: list[torch.Tensor] = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator))
        param.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(param)
    return params


def copies(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        assert p.grad is not None
        q.grad = p.grad.clone()
        out.append(q)
    return out


def implementations(
    rule: str, engines: list[str], params: list[torch.Tensor], before: Any = None
) -> dict[str, torch.optim.Optimizer]:
    ours, theirs, fused = RULES[rule]
    built: dict[str, torch.optim.Optimizer] = {}
    for engine in engines:
        built[engine] = ours(updates, copies(params), engine)
    if before is not None:
        for engine in engines:
            built[f"before {engine}"] = ours(before, copies(params), engine)
    built["torch foreach"] = theirs(copies(params), {"foreach": True})
    if fused:
        built["torch fused"] = theirs(copies(params), {"fused": True})
    return built


def interleaved_times(
    optimizers: dict[str, torch.optim.Optimizer], warmup: int, repeat: int, prelude: Callable[[], Any] | None = None
) -> dict[str, list[float]]:
    """Seconds per step of each optimizer, one step of each in turn per round, each step
    right after ``prelude()`` (untimed) when given."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(warmup + repeat):
        for name, optimizer in optimizers.items():
            if prelude is not None:
                prelude()
            start = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def profile(rule: str, engine: str, params: list[torch.Tensor], steps: int) -> None:
    optimizer = RULES[rule][0](updates, copies(params), engine)
    for _ in range(3):
        optimizer.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            optimizer.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules (default: all)")
    parser.add_argument("--engines", default="foreach", help="comma-separated torchupdates engines")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--big", type=int, default=12, help="number of big tensors (default 12)")
    parser.add_argument("--big-shape", default="1024x1024", help="shape of a big tensor (default 1024x1024)")
    parser.add_argument("--small", type=int, default=188, help="number of small tensors (default 188)")
    parser.add_argument("--small-numel", type=int, default=4096, help="elements of a small tensor (default 4096)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument(
        "--profile",
        metavar="RULE",
        default=None,
        help="profile our step of RULE instead (torch.profiler sees the calling thread only: use --threads 1)",
    )
    parser.add_argument(
        "--after-parallel-work",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a multi-threaded torch operation (untimed) right before each step, as a backward pass "
        "would (default: on; otherwise each step follows the previous optimizer's step)",
    )
    parser.add_argument(
        "--before",
        metavar="SRC",
        default=None,
        help="also time the engines of another checkout (its src folder), e.g. the one before a change",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    big_shape = tuple(int(n) for n in args.big_shape.split("x"))
    params = make_params(args.big, args.small, big_shape, args.small_numel)
    numel = sum(p.numel() for p in params)
    engines = [e for e in args.engines.split(",") if e]
    if args.profile:
        profile(args.profile, engines[0], params, args.repeat)
        return
    print(
        f"{numel / 1e6:.1f}M float32 elements in {len(params)} tensors, torch {torch.__version__}, "
        f"{args.threads} threads; median ms per step over {args.repeat} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    before = load_before(args.before) if args.before else None
    prelude = None
    if args.after_parallel_work:
        # Like the end of a backward pass: a multi-threaded operation just before each step, so
        # that every optimizer starts with torch's threads awake (and spinning).
        source, target = torch.randn(1 << 20), torch.empty(1 << 20)

        def prelude() -> None:
            torch.mul(source, 1.0, out=target)

    ours = [*engines, *([f"before {engine}" for engine in engines] if before is not None else [])]
    columns = [*ours, "torch foreach", "torch fused"]
    header = ["rule", *(f"{c} ms" for c in columns)]
    header += [f"{e} / torch foreach" for e in ours] + [f"{e} / torch fused" for e in ours]
    header += [f"(best-of: {e} / torch foreach)" for e in ours]
    widths = [max(len(h), 17) if i == 0 else len(h) for i, h in enumerate(header)]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)), flush=True)
    for rule in args.rules.split(","):
        built = implementations(rule, engines, params, before)
        times = interleaved_times(built, args.warmup, args.repeat, prelude)
        medians = {name: statistics.median(values) for name, values in times.items()}
        row = [rule] + [f"{medians[c] * 1e3:.3g}" if c in medians else "-" for c in columns]
        for base in ("torch foreach", "torch fused"):
            row += [f"{medians[base] / medians[e]:.2f}x" if base in medians else "-" for e in ours]
        row += [f"{min(times['torch foreach']) / min(times[e]):.2f}x" for e in ours]
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths, strict=True)), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (the machine's other work shows in the times)")


if __name__ == "__main__":
    main()
