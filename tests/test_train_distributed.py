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


def _detection_rows_on_one_rank(rank, world_size, init_file, results):
    """One DDP step where only rank 0's batch has boxes to match; returns the updated weights."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from test_model_e2e_vlp import small_config, synthetic_batch

    from fastvlp.models import E2EVLP

    torch.set_num_threads(1)
    # A short timeout: collectives that do not pair up fail the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = E2EVLP(small_config(matcher_backend="fastvlp", attention_backend="torch"))
        batch = synthetic_batch(seed=rank)
        if rank == 1:
            batch.targets = [None] * batch.batch_size  # e.g. COCO images without instances
        wrapped = DistributedDataParallel(model, find_unused_parameters=True)
        output = wrapped(batch)
        assert ("loss_det" in output.losses) == (rank == 0)
        output.loss.backward()
        results[rank] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()


def test_a_process_without_boxes_to_match_keeps_step_with_the_others(tmp_path):
    """The set loss averages its box count over the processes inside the forward; a process whose batch
    has nothing to match must still join that collective, or the processes' collectives stop pairing up
    (a hang or an error in the gradient all-reduce)."""
    import torch.multiprocessing as mp

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, tests_dir)  # the spawned processes import this folder's helpers
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_detection_rows_on_one_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    assert set(results.keys()) == {0, 1}
    # DDP averaged the gradients: both processes hold the same ones, the detection head's included.
    assert results[0].keys() == results[1].keys()
    assert any(name.startswith("detection_heads.") for name in results[0].keys())
    for name, grad in results[0].items():
        torch.testing.assert_close(grad, results[1][name], rtol=0, atol=0, msg=name)
