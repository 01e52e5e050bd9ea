"""Peak memory of an optimizer's first steps, beside torch.optim's Adam.

Each implementation runs in a fresh process: float32 parameters with gradients are made,
then three Adam steps, and the process's peak resident memory (``ru_maxrss``) is read before
and after. The growth is what the steps cost: Adam's state (twice the parameters) plus
whatever a step holds at once. The engines that keep flat buffers move parameters and state
into them at the first step; this shows what that costs over torch's own steps.

Run from a checkout: ``python benchmarks/bench_memory.py [--mib 400] [--tensors 100] [--new-grads]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

IMPLEMENTATIONS = ("torch foreach", "torch fused", "foreach", "compiled")


def measure(implementation: str, mib: int, tensors: int, new_grads: bool) -> tuple[float, float]:
    """Peak resident MiB before and after three steps, in this process. ``new_grads``: each
    step finds new ``.grad`` tensors, the old ones dropped first (as torch's default
    ``zero_grad()`` and a backward pass leave them)."""
    import torch

    import torchupdates

    numel = mib * (1 << 20) // 4 // tensors
    params = [torch.randn(numel, requires_grad=True) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if implementation.startswith("torch "):
        opt: torch.optim.Optimizer = torch.optim.Adam(params, **{implementation.split()[1]: True})
    else:
        opt = torchupdates.adam(params, engine=implementation)
    for step in range(3):
        if new_grads and step:
            for p in params:
                p.grad = None
                p.grad = torch.randn_like(p)
        opt.step()
    return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=400, help="MiB of float32 parameters (default 400)")
    parser.add_argument("--tensors", type=int, default=100, help="number of parameter tensors (default 100)")
    parser.add_argument(
        "--new-grads", action="store_true", help="new .grad tensors at every step (torch's default zero_grad())"
    )
    parser.add_argument("--one", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)  # the child's part
    args = parser.parse_args()
    if args.one:
        before, after = measure(args.one, args.mib, args.tensors, args.new_grads)
        print(f"{before} {after}")
        return
    grads = "new .grad tensors every step" if args.new_grads else ".grad kept"
    print(f"adam, {args.mib} MiB of float32 parameters in {args.tensors} tensors (state: {2 * args.mib} MiB), {grads}")
    for implementation in IMPLEMENTATIONS:
        command = [sys.executable, __file__, "--one", implementation, "--mib", str(args.mib)]
        command += ["--tensors", str(args.tensors)] + (["--new-grads"] if args.new_grads else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            print(f"{implementation:>14}: failed ({done.stderr.strip().splitlines()[-1]})")
            continue
        before, after = map(float, done.stdout.split())
        print(f"{implementation:>14}: peak {after:7.0f} MiB, +{after - before:5.0f} MiB over parameters and gradients")


if __name__ == "__main__":
    main()
