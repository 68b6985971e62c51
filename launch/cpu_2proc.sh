#!/usr/bin/env bash
# Two CPU processes (gloo DDP). NOTE: `accelerate launch --cpu --num_processes 2` and MULTI_CPU config
# files silently run ONE process; this form (or torchrun) really starts two. The run prints its world size.
#   bash launch/cpu_2proc.sh train/dpo.py --config configs/tiny/dpo.yaml
# Uses the project's .venv (next to this folder) without activating it; otherwise `accelerate` on PATH.
set -euo pipefail
venv_accelerate="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/accelerate"
if [[ -x "$venv_accelerate" ]]; then
  accelerate="$venv_accelerate"
elif ! accelerate="$(command -v accelerate)"; then
  echo "error: accelerate not found: no $venv_accelerate (run scripts/test.sh to set up .venv) and none on PATH" >&2
  exit 2
fi
ACCELERATE_USE_CPU=1 exec "$accelerate" launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no "$@"
