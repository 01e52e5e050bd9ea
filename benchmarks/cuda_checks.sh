#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (a few minutes): the CUDA tests (exactness of the
# compiled and foreach engines against the eager CUDA reference engine, training loops, a user's
# torch.compile), then the benchmark on the GPU. Outputs go to $OUT (default: cuda-checks/).
# Run from a checkout with torchupdates and a CUDA build of torch installed:
#   bash benchmarks/cuda_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-cuda-checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$out/gpu.txt" 2>&1
python -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$out/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >> "$out/gpu.txt"
python -m torchupdates bench --device cuda --shapes issue --repeat 20 --engines foreach,compiled \
    --no-compile-times --json "$out/bench_cuda.json" > "$out/bench_cuda.txt" 2>&1
echo "bench exit $?" >> "$out/gpu.txt"
cat "$out/gpu.txt"
tail -n 5 "$out/test_cuda.txt"
