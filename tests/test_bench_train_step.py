"""`fastvlp bench train` at a tiny size on the CPU: what a timed contender leaves behind and the result schema."""
import json
import sys
import time
import weakref

import pytest
import torch

from fastvlp.bench import train_step
from fastvlp.models import E2EVLP, get_preset

STAGES = {"forward_with_matcher", "backward", "optimizer", "matcher"}


def state_mib(model):
    """What every training step keeps allocated beyond the weights: fp32 gradients and AdamW's two moments."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20


def test_the_resident_memory_sampler_catches_a_peak_freed_before_the_end():
    read = train_step.resident_memory_reader()
    if read is None:
        assert not sys.platform.startswith("linux")  # /proc/self/statm is always there on Linux
        pytest.skip("no way to read the resident set size on this platform")
    import mmap

    size = 64 * 2**20
    with train_step.PeakResidentMemory(read) as sampler:
        entry = sampler.peak
        # A fresh anonymous mapping, every page written: new resident memory whatever the allocators already
        # hold from earlier work in this process, and gone from the resident set once unmapped.
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(20 * train_step.RSS_SAMPLE_INTERVAL_S)
        block.close()
        after = read()
    assert (sampler.peak - entry) / 2**20 >= 60
    assert (sampler.peak - after) / 2**20 >= 60  # the peak is a sample taken while the block lived


def test_a_timed_contender_frees_its_gradients_and_optimizer(monkeypatch):
    device = torch.device("cpu")
    config = get_preset("tiny", attention_backend="torch", matcher_backend="scipy")
    torch.manual_seed(0)
    model = E2EVLP(config)
    batches = [train_step.synthetic_batch(config, 2, 64, 64, torch.Generator().manual_seed(1), device)]
    optimizers = []
    real_build = train_step.build_optimizer

    def recorded_build(module):
        optimizer = real_build(module)
        optimizers.append(weakref.ref(optimizer))
        return optimizer

    monkeypatch.setattr(train_step, "build_optimizer", recorded_build)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    measured = train_step.time_contender(model, batches, repeats=1, warmup=1, amp=False, device=device)

    # The steps ran (weights moved), yet nothing of them stays allocated for the next contender.
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert all(parameter.grad is None for parameter in model.parameters())
    assert len(optimizers) == 1 and optimizers[0]() is None
    assert len(measured["raw_ms"]) == 1 and measured["raw_ms"][0] > 0
    assert measured["peak_memory_above_start_mb"] is None  # the CUDA allocator's, measured on CUDA only
    # On the CPU the resident memory grew by at least the gradients and optimiser state the steps created.
    assert measured["peak_rss_above_start_mb"] >= state_mib(model)
    stages = measured["stages"]
    assert set(stages) == STAGES and all(value > 0 for value in stages.values())
    assert {name: len(values) for name, values in measured["stages_raw_ms"].items()} == dict.fromkeys(STAGES, 1)
    # The matcher is timed as the model builds it, and the row says how.
    assert measured["matcher_check_finite"] is model.criterion.matcher.check_finite is True
    # One repeat: the medians are single runs, and the forward's time contains the matcher's.
    assert stages["matcher"] < stages["forward_with_matcher"]


def test_train_bench_writes_the_relative_peak_and_named_stages(tmp_path):
    least = state_mib(E2EVLP(get_preset("tiny")))
    assert train_step.main(["--device", "cpu", "--batch-size", "1", "--image-size", "64x64", "--repeats", "1",
                            "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/train_step.json")
    payload = json.loads(path.read_text())
    assert (payload["repeats"], payload["warmup"]) == (1, 0) and payload["provenance"]["torch_threads"] >= 1
    rows = payload["results"]
    assert [row["contender"] for row in rows] == ["fastvlp", "torch-scipy"]
    for row in rows:
        assert "peak_memory_mb" not in row and row["peak_memory_above_start_mb"] is None
        # Each contender's resident peak holds at least its own gradients and optimiser state (without the
        # heap handed back between contenders, the second one's start would hold memory the first one freed).
        assert row["peak_rss_above_start_mb"] >= least
        assert set(row["stages"]) == STAGES
    table = path.with_suffix(".md").read_text()
    assert "peak_rss_above_start_mb" in table and "peak_memory_above_start_mb" not in table
