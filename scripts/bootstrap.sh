#!/usr/bin/env bash
# Create (or reuse) the project venv at .venv with deradiff and its test/scale-out extras installed.
# torch is pinned in the same pip command: unpinned, a dependency would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN="torch==2.13.0"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.deradiff-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_PIN" -e ".[dev,deepspeed]"
  touch "$stamp"
fi
