#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the default test suite (CPU, < 10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
