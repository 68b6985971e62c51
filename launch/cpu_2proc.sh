#!/usr/bin/env bash
# Two CPU processes (gloo DDP). NOTE: `accelerate launch --cpu --num_processes 2` and MULTI_CPU config
# files silently run ONE process; this form (or torchrun) really starts two. The run prints its world size.
#   launch/cpu_2proc.sh train/dpo.py --config configs/tiny/dpo.yaml
set -euo pipefail
ACCELERATE_USE_CPU=1 exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no "$@"
