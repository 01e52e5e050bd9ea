"""The compiled engine's two gradient paths, beside torch.optim.Adam(fused=True).

``in place``: ``.grad`` stays the tensor the engine made a view of its flat buffer (a loop that
zeroes gradients with ``zero_grad(set_to_none=False)``, or accumulates), so a step reads the
gradients where they are. ``copy``: every step finds a new ``.grad`` tensor (torch's default
``zero_grad()`` sets gradients to None and backward allocates new ones), so the step first
copies each gradient into the flat buffer. Only ``step()`` is timed; the new gradients are made
before the clock starts.

Run from a checkout: ``python benchmarks/bench_grad_paths.py [--repeat N]``.
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
    args = parser.parse_args()
    moved = 7 * 4 * sum(torch.Size(s).numel() for s in SHAPES)  # Adam: p, g, m, v read; p, m, v written
    print(f"adam, {len(SHAPES)} tensors, 13.4M float32 elements; GB/s = 28 bytes per element / median step time")
    for path, fresh in (("in place", False), ("copy", True)):
        fused_params, our_params = make_params(), make_params()
        fused = torch.optim.Adam(fused_params, lr=1e-3, fused=True)
        ours = torchupdates.adam(our_params, engine="compiled")
        ours.step()  # compiles outside the timing
        fused_seconds = median_seconds(fused.step, fused_params, fresh, args.repeat)
        our_seconds = median_seconds(ours.step, our_params, fresh, args.repeat)
        print(
            f"{path:>8}: torch fused {moved / fused_seconds / 1e9:5.1f} GB/s, "
            f"compiled {moved / our_seconds / 1e9:5.1f} GB/s, ratio {fused_seconds / our_seconds:.2f}x"
        )


if __name__ == "__main__":
    main()
