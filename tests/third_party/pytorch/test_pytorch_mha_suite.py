"""PyTorch's own MultiheadAttention tests pass with fastvlp's module in place of torch's.

``pytorch_mha_suite.py`` runs them; it goes in a separate pytest process because importing
``torch.testing._internal`` changes global torch state that the rest of the test session relies on.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
RUNNER = HERE / "pytorch_mha_suite.py"
# Kept in step with pytorch_mha_suite.py.
UPSTREAM_ENV = "FASTVLP_PYTORCH_MHA_TESTS"
UPSTREAM_DEFAULT = HERE / "upstream" / "test_multihead_attention.py"
# CPU tests of public behaviour in PyTorch's file (2.11 era); a GPU adds its CUDA-only ones.
MIN_PASSED = 11


@pytest.mark.slow
def test_pytorch_multihead_attention_suite_passes():
    upstream = Path(os.environ.get(UPSTREAM_ENV) or UPSTREAM_DEFAULT)
    if not upstream.is_file():
        pytest.skip(f"PyTorch's test/nn/test_multihead_attention.py not found at {upstream} (set {UPSTREAM_ENV})")
    pytest.importorskip("expecttest", reason="torch.testing._internal needs the expecttest package")

    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=python_path, **{UPSTREAM_ENV: str(upstream)})
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(RUNNER)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MIN_PASSED + 1, output[-6000:]  # + the substitution check
    assert "failed" not in summary and "error" not in summary, summary
