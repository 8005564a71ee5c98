"""`bench/gpu.sh` and its run summary, on a CPU: a run without a GPU stops and says so, a test run where
every test is skipped counts as failed, and the summary names failed steps and partial or older files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvlp.bench import run_summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _write(path: Path, payload) -> None:
    path.write_text(json.dumps(payload))


def test_summary_names_failed_gating_steps_partial_files_and_older_files(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("gpu-check\tok\t1\tlog: logs/gpu-check.log\n"
                     "build\tok\t40\tlog: logs/build.log\n"
                     "cuda-tests\tfailed\t90\texit 1 (log: logs/cuda-tests.log)\n"
                     "bench-attention\ttimed out\t300\tcut at 300s\n"
                     "sanitizer\tskipped\t0\tcompute-sanitizer not found on PATH\n")
    _write(tmp_path / "attention.json", {"complete": False, "provenance": {"run_id": "R1", "git_commit": "abc"}})
    _write(tmp_path / "lsap.json", {"complete": True, "provenance": {"run_id": "R1", "git_commit": "abc"}})
    _write(tmp_path / "train_step.json", {"results": []})  # an old file without provenance
    summary = run_summary.summarize_run(tmp_path, run_summary.read_steps(steps), "R1")
    assert summary["ok"] is False and summary["failed_steps"] == ["cuda-tests", "bench-attention"]
    warnings = "\n".join(summary["warnings"])
    assert "cuda-tests FAILED - the results below are not backed by it" in warnings
    assert "bench-attention TIMED OUT" in warnings and "attention.json is PARTIAL" in warnings
    assert "sanitizer skipped: compute-sanitizer not found" in warnings
    files = {entry["file"]: entry for entry in summary["files"]}
    assert files["lsap.json"]["this_run"] and files["lsap.json"]["complete"] is True
    assert not files["train_step.json"]["this_run"] and "lsap.json is PARTIAL" not in warnings
    table = run_summary.markdown(summary)
    assert "**step cuda-tests FAILED" in table and "| train_step.json | no (an earlier run) |" in table


def test_summary_rejects_a_malformed_steps_file(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\tsort of\t3\tdetail\n")
    with pytest.raises(ValueError, match="line 1"):
        run_summary.read_steps(steps)
    with pytest.raises(ValueError, match="run_id"):
        run_summary.summarize_run(tmp_path, [], "")


@needs_bash
def test_a_test_run_where_everything_is_skipped_counts_as_failed(tmp_path):
    (tmp_path / "test_skipped.py").write_text("import pytest\n\n\ndef test_needs_a_gpu():\n    pytest.skip('no GPU')\n")
    (tmp_path / "test_passes.py").write_text("def test_runs():\n    assert 1 + 1 == 2\n")

    def gpu_pytest(*arguments):
        command = f'source "{SCRIPT}"; PYTHON="{sys.executable}"; gpu_pytest -q -p no:cacheprovider {" ".join(arguments)}'
        quick = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")  # plain pytest starts faster
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=quick, capture_output=True, text=True,
                              timeout=120)

    skipped = gpu_pytest("test_skipped.py")
    assert skipped.returncode != 0 and "no test passed" in skipped.stdout
    assert gpu_pytest("test_skipped.py", "test_passes.py").returncode == 0


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without a GPU")
def test_the_script_stops_without_a_gpu_and_records_why(tmp_path):
    environment = dict(os.environ, PYTHON=sys.executable, RESULTS_ROOT=str(tmp_path), OUT="", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "STOPPED: no CUDA device visible" in done.stdout
    [summary_path] = tmp_path.glob("*/gpu_run.json")
    summary = json.loads(summary_path.read_text())
    assert summary["failed_steps"] == ["gpu-check"] and summary["ok"] is False
    assert [step["name"] for step in summary["steps"]] == ["gpu-check"]  # nothing ran after it
    assert (summary_path.parent / "logs" / "gpu-check.log").exists()


def test_summary_lists_the_comparison_runs_files_in_subfolders(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("bench-attention-ref\tok\t60\tlog: logs/bench-attention-ref.log\n")
    old = tmp_path / "attention-at-0f64823" / "nvidia-h100"
    old.mkdir(parents=True)
    _write(old / "attention.json", {"complete": True, "provenance": {"run_id": "R2", "git_commit": "0f64823"}})
    _write(tmp_path / "gpu_run_e2e.json", {"steps": []})  # an earlier call's summary, not a result file
    summary = run_summary.summarize_run(tmp_path, run_summary.read_steps(steps), "R2")
    files = {entry["file"]: entry for entry in summary["files"]}
    assert list(files) == ["attention-at-0f64823/nvidia-h100/attention.json"]
    assert files["attention-at-0f64823/nvidia-h100/attention.json"]["git_commit"] == "0f64823"


def _head_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@needs_bash
@pytest.mark.skipif(shutil.which("git") is None or _head_commit() is None, reason="needs git and this checkout's history")
def test_the_reference_commits_files_name_this_run_even_from_before_provenance(tmp_path):
    """An ATTENTION_REF_COMMIT from before result files recorded their provenance (0f64823, the documented
    example) writes files without a run id: the summary must still list them as this run's, with that commit."""
    commit = _head_commit()
    fake = tmp_path / "python"  # the benchmark's calls write a result file; anything else runs in Python
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2 $3 $4" = "-m fastvlp bench attention" ]; then
  while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && out=$2; shift; done
  mkdir -p "$out/fake-gpu"
  if [ -n "${{PYTHONPATH:-}}" ]; then  # the reference commit's own code, from before provenance
    echo '{{"benchmark": "attention", "device": "fake-gpu", "results": []}}' >"$out/fake-gpu/attention.json"
  else
    echo '{{"benchmark": "attention", "complete": true, "provenance": {{"run_id": "R9", "git_commit": "head"}},
           "results": []}}' >"$out/fake-gpu/attention.json"
  fi
  exit 0
fi
exec "{sys.executable}" "$@"
""")
    fake.chmod(0o755)
    results = tmp_path / "results"
    command = (f'source "{SCRIPT}"; PYTHON="{fake}" RESULTS_DIR="{results}" ATTENTION_REF_COMMIT={commit} '
               f'FASTVLP_BENCH_RUN_ID=R9 attention_at_ref')
    environment = dict(os.environ, TMPDIR=str(tmp_path))  # the reference commit's package is unpacked there
    environment.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not list(tmp_path.glob("tmp.*")), "the reference commit's unpacked tree was left behind"
    summary = run_summary.summarize_run(results, [], "R9")
    files = {entry["file"]: entry for entry in summary["files"]}
    assert set(files) == {f"attention-at-{commit[:9]}/fake-gpu/attention.json", "attention-at-head/fake-gpu/attention.json"}
    old = files[f"attention-at-{commit[:9]}/fake-gpu/attention.json"]
    assert old["this_run"] and old["complete"] is True and old["git_commit"].startswith(commit)
    assert files["attention-at-head/fake-gpu/attention.json"]["git_commit"] == "head"  # its own record is kept
    assert not summary["warnings"]
