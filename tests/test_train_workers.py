"""Data loading in worker processes (``--num-workers``) gives the same batches, so the same run, as loading in
the training process, and a run stopped and resumed with workers continues it bit for bit."""
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import small_options, write_corpus

from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.pretrain import run_pretraining


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    broken = sorted((corpus / "vg" / "images").glob("*.jpg"))[1]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated image, skipped in a worker like in-process
    return corpus


def _weights(result):
    return load_file(str(result.checkpoint / "model.safetensors"))


def test_workers_load_the_same_batches_and_resume_bit_for_bit(data, tmp_path):
    in_process = run_pretraining(small_options(data, tmp_path / "in-process", max_steps=4))
    with_workers = run_pretraining(small_options(data, tmp_path / "workers", max_steps=4, num_workers=2))
    expected, found = _weights(in_process), _weights(with_workers)
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)
    reference = read_metrics(in_process.metrics_path)
    records = read_metrics(with_workers.metrics_path)
    assert [(r["loss"], r["skipped_records"]) for r in records] == [(r["loss"], r["skipped_records"]) for r in reference]
    assert reference[-1]["skipped_records"] >= 1

    out = tmp_path / "stopped"
    run_pretraining(small_options(data, out, max_steps=4, stop_after=2, num_workers=2))
    resumed = run_pretraining(small_options(data, out, max_steps=4, resume=True, num_workers=2))
    found = _weights(resumed)
    assert all(torch.equal(expected[k], found[k]) for k in expected)
