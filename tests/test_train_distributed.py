"""A 2-process DDP pre-training run with gloo on the CPU, launched with torchrun as a user would."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from train_helpers import SMALL_MODEL, write_corpus

from fastvlp.train.checkpoint import list_checkpoints
from fastvlp.train.metrics_log import read_metrics


def test_two_process_gloo_run_finishes_and_checkpoints(tmp_path):
    data = write_corpus(tmp_path)
    broken = sorted((data / "vg" / "images").glob("*.jpg"))[::2]
    for image in broken:
        image.write_bytes(image.read_bytes()[:200])  # truncated JPEGs, met by either rank
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fastvlp", "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out),
        "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
        "--vocab", str(tmp_path / "vocab.txt"),
    ] + [f"--set={name}={value}" for name, value in SMALL_MODEL.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Run from another directory: the command must not depend on the working directory.
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its workers, nothing else
        launcher.communicate()
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["step-2"]
    trainer = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert trainer["world_size"] == 2 and trainer["step"] == 2
    rng = json.loads((checkpoints[0] / "rng.json").read_text())
    assert set(rng["__dict__"]) == {"s:rank0", "s:rank1"}
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["samples_seen"] == 2 * 2 * 2  # 2 steps x 2 processes x batch 2
    # Every skipped record is named in the run's log, whichever rank read it.
    log = (out / "train.log").read_text()
    named = [image.name for image in broken if f"/{image.name}" in log]
    assert records[-1]["skipped_records"] == len(trainer["unreadable_indices"]) == len(named) >= 1


def test_resolve_device_names_the_argument_for_a_malformed_or_missing_device():
    from fastvlp.train.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device: expected cpu, cuda or cuda:N, got 'cpux'"):
        resolve_device("cpux")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: 'cuda' asked for, but CUDA is not available"):
            resolve_device("cuda")
