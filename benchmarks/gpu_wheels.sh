#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch, transformers, peft, accelerate, pandas,
# pyarrow, but not diffusers or datasets) for its Python 3.12 into .whl/ (git-ignored through
# .git/info/exclude). Versions pinned to what the CPU test suite runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0
du -sh .whl
