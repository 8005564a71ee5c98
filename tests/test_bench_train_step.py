"""`fastvlp bench train` at a tiny size on the CPU: what a timed contender leaves behind and the result schema."""
import json
import sys
import time
import types
import weakref

import pytest
import torch
import torchvision

from fastvlp.bench import common, train_step
from fastvlp.models import E2EVLP, get_preset
from fastvlp.models.backbone import Backbone

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
    warm_ups = []
    real_warm_up = common.warm_up

    def recorded_warm_up(call, calls, min_seconds=0.0, synchronize=lambda: None):
        warm_ups.append((calls, min_seconds))
        return real_warm_up(call, calls, min_seconds, synchronize)

    monkeypatch.setattr(train_step, "warm_up", recorded_warm_up)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    measured = train_step.time_contender(model, batches, repeats=1, warmup=1, amp=False, device=device,
                                         min_warmup_s=0.01)

    # The steps ran (weights moved), yet nothing of them stays allocated for the next contender.
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    assert all(parameter.grad is None for parameter in model.parameters())
    assert len(optimizers) == 1 and optimizers[0]() is None
    assert len(measured["raw_ms"]) == 1 and measured["raw_ms"][0] > 0
    # The warm-up is of whole optimiser steps, by count and by time; its first step's loss is kept.
    assert warm_ups == [(1, 0.01)] and measured["warmup_steps"] >= 1
    assert measured["first_step_loss"] > 0
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
    assert train_step.main(TINY + ["--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/train_step.json")
    payload = json.loads(path.read_text())
    assert (payload["repeats"], payload["warmup"]) == (1, 1) and payload["provenance"]["torch_threads"] >= 1
    assert payload["min_warmup_s"] == 0.0  # the time floor is for GPUs
    rows = payload["results"]
    assert [row["contender"] for row in rows] == ["fastvlp", "torch-scipy"]
    # Same weights, same batch, float32 and no dropout: the first steps' losses agree.
    assert rows[0]["first_step_loss_diff_to_first_contender"] is None
    assert rows[1]["first_step_loss_diff_to_first_contender"] == pytest.approx(
        abs(rows[1]["first_step_loss"] - rows[0]["first_step_loss"]))
    assert rows[1]["first_step_loss_diff_to_first_contender"] < 1e-3 * rows[0]["first_step_loss"]
    for row in rows:
        assert row["warmup_steps"] == 1 and "drift" not in row  # one repeat is too few to tell
        assert "peak_memory_mb" not in row and row["peak_memory_above_start_mb"] is None
        # Each contender's resident peak holds at least its own gradients and optimiser state (without the
        # heap handed back between contenders, the second one's start would hold memory the first one freed).
        assert row["peak_rss_above_start_mb"] >= least
        assert set(row["stages"]) == STAGES
    table = path.with_suffix(".md").read_text()
    assert "peak_rss_above_start_mb" in table and "peak_memory_above_start_mb" not in table


TINY = ["--device", "cpu", "--batch-size", "1", "--image-size", "64x64", "--repeats", "1", "--warmup", "1"]


def test_a_contender_needs_a_warm_up_step():
    with pytest.raises(ValueError, match="warmup"):
        train_step.time_contender(None, [], repeats=1, warmup=0, amp=False, device=torch.device("cpu"))


def test_the_warm_up_has_a_time_floor_on_gpus_only():
    assert train_step.min_warmup_seconds(torch.device("cuda")) == common.MIN_CUDA_WARMUP_S > 0
    assert train_step.min_warmup_seconds(torch.device("cpu")) == 0.0


def test_the_printed_speedup_says_when_a_row_had_not_settled(tmp_path, monkeypatch, capsys):
    def rows(*args, **kwargs):
        falling = common.result_row("train-step", "fastvlp", "tiny", [4, 4, 4, 2, 2, 2], first_step_loss=7.0,
                                    first_step_loss_diff_to_first_contender=None, stages={})
        flat = common.result_row("train-step", "torch-scipy", "tiny", [3] * 6, first_step_loss=7.5,
                                 first_step_loss_diff_to_first_contender=0.5, stages={})
        return [falling, flat]

    monkeypatch.setattr(train_step, "run", rows)
    assert train_step.main(TINY + ["--repeats", "6", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("fastvlp step vs torch/scipy step: 1.00x (unsettled: fastvlp drift 2.00); first-step losses differ "
            "by 0.5") in out
    (path,) = tmp_path.glob("*/train_step.json")
    assert [row["settled"] for row in json.loads(path.read_text())["results"]] == [False, True]


@pytest.mark.parametrize("bad, message", [
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--image-size", "0x0"], "--image-size must look like"),
    (["--image-size", "32x64"], "sides of at least 64"),
    (["--image-size", "64by64"], "--image-size must look like"),
    (["--image-size", "64x64x3"], "--image-size must look like"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--device", "gpu"], "--device must name a device"),
])
def test_train_bench_rejects_bad_arguments_before_building_models(tmp_path, monkeypatch, capsys, bad, message):
    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before the arguments were checked")

    monkeypatch.setattr(train_step, "run", no_run)
    with pytest.raises(SystemExit) as stopped:
        train_step.main(TINY + bad + ["--out-dir", str(tmp_path)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_train_bench_without_a_gpu_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_step.main(TINY + ["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_torchvision_backbone_row_uses_torchvision_batch_norm_in_nchw():
    torch.manual_seed(0)
    model = types.SimpleNamespace(backbone=Backbone("resnet18", 8, frozen_batch_norm=True).eval())
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pixel_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ours = model.backbone(images, pixel_mask).features
        train_step.as_torchvision_backbone(model)
        theirs = model.backbone(images, pixel_mask).features
    assert model.backbone.layout is torch.contiguous_format
    norms = [m for m in model.backbone.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert norms and all(type(m) is torchvision.ops.FrozenBatchNorm2d for m in norms)
    assert torch.equal(ours, theirs)  # float32: the same computation
    # Under bf16 autocast torchvision's batch norm gives float32, which is what the row measures.
    dtypes = []
    norms[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.backbone(images, pixel_mask)
    assert dtypes == [torch.float32]


def test_train_bench_adds_the_torchvision_backbone_row(tmp_path, capsys):
    assert train_step.main(TINY + ["--torchvision-backbone", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/train_step.json")
    payload = json.loads(path.read_text())
    assert payload["torchvision_backbone"] is True
    rows = payload["results"]
    assert [row["contender"] for row in rows] == ["fastvlp", "torch-scipy", train_step.TORCHVISION_BACKBONE]
    # tiny trains its batch norm, and on the CPU both layouts are NCHW: the same losses as torch/scipy.
    assert rows[2]["first_step_loss"] == pytest.approx(rows[1]["first_step_loss"], rel=1e-5)
    assert "torch/scipy step with fastvlp's backbone vs torchvision's: " in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["fastvlp", "scipy"])
def test_the_matcher_is_timed_once_per_call_in_either_form(backend):
    """The criterion asks the batched solver for a dense assignment (``assign``) and scipy's matcher through
    ``forward``; either is one timed call per step (all layers are matched together), and ``forward`` of the
    batched solver, which calls ``assign`` inside, is counted once too."""
    config = get_preset("tiny", attention_backend="torch", matcher_backend=backend)
    torch.manual_seed(0)
    model = E2EVLP(config).train()
    batch = train_step.synthetic_batch(config, 2, 64, 64, torch.Generator().manual_seed(1), torch.device("cpu"))
    spent = []
    with train_step._timed_matcher(model, torch.device("cpu"), spent):
        output = model(batch)
        assert len(spent) == 1 and spent[0] > 0
        detection = output.detection
        outputs = {"pred_logits": detection.pred_logits, "pred_boxes": detection.pred_boxes}
        model.criterion.matcher(outputs, [batch.targets[int(row)] for row in output.detection_rows])
        assert len(spent) == 2
    assert "assign" not in vars(model.criterion.matcher)  # the method is the class's again


def test_contenders_get_batches_as_the_trainer_builds_them():
    import torch

    from fastvlp.bench.train_step import as_trainer_builds, synthetic_batch
    from fastvlp.models import E2EVLP, get_preset

    torch.manual_seed(0)
    config = get_preset("tiny", matcher_backend="fastvlp")
    fast, plain = E2EVLP(config), E2EVLP(config.replace(attention_backend="torch", matcher_backend="scipy"))
    batches = [synthetic_batch(config, 4, 64, 96, torch.Generator().manual_seed(1), "cpu")]
    (built,) = as_trainer_builds(fast, batches)
    assert built.targets is None and built.padded_targets is not None and torch.equal(built.images, batches[0].images)
    assert as_trainer_builds(plain, batches) is batches
