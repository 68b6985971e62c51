#!/usr/bin/env bash
# The GPU tests and both benchmarks on one GPU in one prepared run (the device tool: one call, carry [".whl"]).
#   here:   bash benchmarks/gpu_wheels.sh
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Expected length on an H200: a few minutes (SD1.5-sized UNet, fp16 + bf16, batch 1 and 8; DPO ladder bf16).
# Results land in $OUT (the device tool brings them back); copy the tables into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/deradiff-gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# every import the runs need, first: a version clash shows here in one line, not halfway through
python3 -c "import torch, diffusers, peft, accelerate, transformers, datasets, pyarrow, deradiff.testing
print(*(f'{m.__name__} {m.__version__}' for m in (torch, diffusers, peft, accelerate, transformers, datasets, pyarrow)))" \
  | tee -a "$out/gpu.txt"
# the benchmarks still run when a GPU test fails; the failure is the last line of gpu_tests.txt
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" \
  || echo "GPU TESTS FAILED (see gpu_tests.txt)" | tee -a "$out/gpu_tests.txt"
python3 benchmarks/realign_speed.py --skip-cpu --gpu-batches 1 8 --gpu-dtypes float16 bfloat16 --gpu-steps 20 \
  --gpu-repeats 3 2>&1 | tee "$out/realign_speed.txt"
python3 benchmarks/dpo_throughput.py --model sd15 --device cuda --dtype bfloat16 --pairs 4 --steps 5 --rounds 3 \
  2>&1 | tee "$out/dpo_throughput.txt"
