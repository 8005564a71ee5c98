#!/usr/bin/env bash
# Sets up .venv/ with torch, the package (built in place with its C++/CUDA extension) and the
# test and benchmark extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip setuptools wheel
if ! python -c "import torch, torchvision" 2>/dev/null; then
  # The CUDA build of torch with Triton; the same wheel runs on machines without a GPU.
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
python -m pip install --quiet pybind11 cmake ninja numpy
python -m pip install --quiet --no-build-isolation -e ".[test,bench]"
python -c "import fastvlp; print('fastvlp', fastvlp.__version__, fastvlp.build_info())"
