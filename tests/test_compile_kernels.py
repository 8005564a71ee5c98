"""scripts/compile_kernels.py: the attention kernels compile for an H100/H200 target on a machine with no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
KERNELS = ("attention_forward_kernel", "attention_backward_dq_kernel", "attention_backward_dkdv_kernel",
           "attention_backward_delta_kernel", "dropout_keep_kernel")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dtypes", "float16", "--head-dims", "32", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_a_too_small_shared_memory_limit_fails():
    result = _run()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    for kernel in KERNELS:
        assert any(kernel in line for line in compiled), f"{kernel} was not compiled:\n{result.stdout}"
    assert "0 failed; 0 over" in result.stdout
    # The same kernels against a 1 KB limit, compiled in two processes: the check reports them and fails.
    tight = _run("--max-shared-kb", "1", "--jobs", "2")
    assert tight.returncode == 1 and "over the limit" in tight.stdout
    summary = next(line for line in tight.stdout.splitlines() if "kernels compiled" in line)
    assert summary.startswith(f"{len(compiled)} kernels compiled"), tight.stdout[-2000:]


def test_refuses_to_run_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr
