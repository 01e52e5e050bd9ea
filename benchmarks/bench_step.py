"""Time one optimizer step of every rule, beside torch.optim in the same run.

Speed is reported as effective bandwidth: the bytes a rule must read and write per step
(parameters, gradients and state, once each) divided by the step time. Example::

    python benchmarks/bench_step.py --numel 13.4e6 --tensors 200 --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import torchupdates as updates

TorchFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Case:
    rule: str
    tensors_moved: int  # per parameter element: reads + writes of p, g and state
    ours: Callable[[list[torch.Tensor], str], torch.optim.Optimizer]
    torch_optim: TorchFactory | None


CASES = [
    Case("sgd", 3, lambda p, e: updates.sgd(p, 0.01, engine=e), lambda p: torch.optim.SGD(p, 0.01, foreach=True)),
    Case(
        "momentum",
        5,
        lambda p, e: updates.momentum(p, 0.01, engine=e),
        lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, foreach=True),
    ),
    Case(
        "nesterov_momentum",
        5,
        lambda p, e: updates.nesterov_momentum(p, 0.01, engine=e),
        lambda p: torch.optim.SGD(p, 0.01, momentum=0.9, nesterov=True, foreach=True),
    ),
    Case(
        "adagrad",
        5,
        lambda p, e: updates.adagrad(p, 0.01, engine=e),
        lambda p: torch.optim.Adagrad(p, 0.01, foreach=True),
    ),
    Case(
        "rmsprop",
        5,
        lambda p, e: updates.rmsprop(p, 0.01, engine=e),
        lambda p: torch.optim.RMSprop(p, 0.01, foreach=True),
    ),
    Case("adadelta", 7, lambda p, e: updates.adadelta(p, engine=e), lambda p: torch.optim.Adadelta(p, foreach=True)),
    Case("adam", 7, lambda p, e: updates.adam(p, engine=e), lambda p: torch.optim.Adam(p, foreach=True)),
    Case("adamax", 7, lambda p, e: updates.adamax(p, engine=e), lambda p: torch.optim.Adamax(p, foreach=True)),
    Case(
        "amsgrad",
        9,
        lambda p, e: updates.amsgrad(p, engine=e),
        lambda p: torch.optim.Adam(p, amsgrad=True, foreach=True),
    ),
]


def make_params(numel: int, tensors: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    params = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def time_steps(optimizer: torch.optim.Optimizer, repeat: int) -> float:
    """Median seconds of one ``step()`` after two warm-up steps."""
    for _ in range(2):
        optimizer.step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=float, default=4e6, help="parameter elements in all (default 4e6)")
    parser.add_argument("--tensors", type=int, default=200, help="number of parameter tensors (default 200)")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per measurement (default 10)")
    parser.add_argument("--rules", default=",".join(c.rule for c in CASES), help="comma-separated rules")
    args = parser.parse_args()
    numel = int(args.numel)
    wanted = args.rules.split(",")
    params = make_params(numel, args.tensors)
    print(
        f"{numel:,} float32 elements in {args.tensors} tensors, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; GB/s = bytes moved / median step time"
    )
    header = f"{'rule':<18} {'torch foreach':>14} {'ours foreach':>13} {'ours reference':>15} {'foreach ratio':>14}"
    print(header)
    print("-" * len(header))
    for case in CASES:
        if case.rule not in wanted:
            continue
        moved = case.tensors_moved * 4 * numel
        rates = {}
        if case.torch_optim is not None:
            rates["torch"] = moved / time_steps(case.torch_optim(params), args.repeat) / 1e9
        for engine in ("foreach", "reference"):
            rates[engine] = moved / time_steps(case.ours(params, engine), args.repeat) / 1e9
        ratio = rates["foreach"] / rates["torch"] if "torch" in rates else float("nan")
        print(
            f"{case.rule:<18} {rates.get('torch', float('nan')):>11.1f} GB/s {rates['foreach']:>8.1f} GB/s "
            f"{rates['reference']:>10.1f} GB/s {ratio:>13.2f}x"
        )


if __name__ == "__main__":
    main()
