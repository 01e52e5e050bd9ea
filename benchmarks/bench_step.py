"""Time one optimizer step of every rule beside torch.optim: ``python -m torchupdates bench``.

Kept here so that ``python benchmarks/bench_step.py [options]`` works from a checkout; see
``python -m torchupdates bench --help`` for the options. Examples::

    python benchmarks/bench_step.py --shapes issue --json bench.json   # the issue's workload, every section
    python benchmarks/bench_step.py --numel 4e6 --tensors 200 --rules adam,sgd --no-compile-times --no-scaling
"""

import sys

from torchupdates.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
