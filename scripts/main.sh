#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the realignment study on the embedded tiny model.
# Extra arguments are config overrides, e.g. `bash scripts/main.sh output_dir=outputs/my-study`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/deradiff study --config configs/tiny/study.yaml "$@"
