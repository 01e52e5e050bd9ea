"""The two gradient paths of the engines that keep flat buffers, beside torch.optim's Adam.

``in place``: ``.grad`` stays the same tensor between steps (a loop that zeroes gradients with
``zero_grad(set_to_none=False)``, or accumulates). ``copy``: every step finds a new ``.grad``
tensor (torch's default ``zero_grad()`` sets gradients to None and backward allocates new
ones). The compiled engine reads a new gradient of 256K elements or more where it is (one
kernel call for its tensor) and copies smaller ones into its flat buffer (a gradient found
again at the next step becomes a view of the buffer, so the in-place path reads it there);
the foreach engine on CPU reads every gradient where it is, so its two paths should cost
about the same. Only ``step()`` is timed; the
new gradients are made before the clock starts. Ratios compare with torch's fused and foreach
Adam timed the same way.

Run from a checkout: ``python benchmarks/bench_grad_paths.py [--repeat N] [--engines compiled,foreach]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import torchupdates

SHAPES = [(1024, 1024)] * 12 + [(4096,)] * 188  # 13.4M float32 elements in 200 tensors


def make_params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def median_seconds(step: Callable[[], object], params: list[torch.Tensor], fresh_grads: bool, repeat: int) -> float:
    times = []
    for k in range(repeat + 3):
        if fresh_grads:
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
        start = time.perf_counter()
        step()
        if k >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--engines", default="compiled,foreach", help="comma-separated torchupdates engines")
    args = parser.parse_args()
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    moved = 7 * 4 * sum(torch.Size(s).numel() for s in SHAPES)  # Adam: p, g, m, v read; p, m, v written
    print(f"adam, {len(SHAPES)} tensors, 13.4M float32 elements; GB/s = 28 bytes per element / median step time")
    for path, fresh in (("in place", False), ("copy", True)):
        torch_params = {"fused": make_params(), "foreach": make_params()}
        torch_seconds = {
            kind: median_seconds(torch.optim.Adam(params, lr=1e-3, **{kind: True}).step, params, fresh, args.repeat)
            for kind, params in torch_params.items()
        }
        line = [f"{path:>8}: torch fused {moved / torch_seconds['fused'] / 1e9:5.1f} GB/s"]
        line.append(f"torch foreach {moved / torch_seconds['foreach'] / 1e9:5.1f} GB/s")
        for engine in engines:
            params = make_params()
            ours = torchupdates.adam(params, engine=engine)
            ours.step()  # compiles (or builds buffers) outside the timing
            seconds = median_seconds(ours.step, params, fresh, args.repeat)
            line.append(
                f"{engine} {moved / seconds / 1e9:5.1f} GB/s ({torch_seconds['fused'] / seconds:.2f}x fused, "
                f"{torch_seconds['foreach'] / seconds:.2f}x torch foreach)"
            )
        print(", ".join(line))


if __name__ == "__main__":
    main()
