#!/usr/bin/env bash
# Downloads PyTorch's own MultiheadAttention tests (test/nn/test_multihead_attention.py, which the
# torch wheel does not ship) for the installed torch release, so that
# tests/third_party/pytorch/ runs them against fastvlp.nn.MultiheadAttention.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
target=tests/third_party/pytorch/upstream
mkdir -p "$target"
for file in test/nn/test_multihead_attention.py LICENSE; do
  curl -fsSL "https://raw.githubusercontent.com/pytorch/pytorch/v$version/$file" -o "$target/$(basename "$file")"
done
echo "PyTorch v$version tests in $target; run: $PYTHON -m pytest -q tests/third_party/pytorch"
