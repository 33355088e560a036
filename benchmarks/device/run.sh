#!/usr/bin/env bash
# The one call on the lent GPU machine (see README.md): the gpu-marked tests, then the engine
# benchmark (eager, then compiled), each result copied to $OUT as soon as it exists.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts= \
    tests/pixels/test_device_cuda.py tests/transforms/diffusion/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
BENCH=(python3 benchmarks/gpu_engine.py --preset sd-turbo --size 512 --frames "${FRAMES:-40}")
timeout 150 "${BENCH[@]}" --compile off 2>&1 | tee "$OUT/engine-eager.txt"
timeout "${COMPILE_BUDGET_S:-330}" "${BENCH[@]}" --compile on --no-diffusers \
    --compile-mode reduce-overhead --compile-cache-dir /tmp/livediff-compile-cache \
    2>&1 | tee "$OUT/engine-compiled.txt"
ls -la "$OUT"
