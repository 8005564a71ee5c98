"""``--cuda-graph`` training: its settings checks, the fixed-shape batches it replays, the replay-or-eager choice,
and (on CUDA) a run that stops, resumes and logs its fallbacks."""
import math

import pytest
import torch
from train_helpers import small_options, write_corpus

import fastvlp.train.graph_steps as graph_steps
from fastvlp.bench.train_step import synthetic_batch
from fastvlp.models import E2EVLP, get_preset
from fastvlp.train.graph_steps import GraphSteps, cuda_graph_problem
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.pretrain import fixed_shape_batches, run_pretraining

CUDA = torch.device("cuda")


def test_cuda_graph_problems_name_what_is_wrong():
    assert cuda_graph_problem(CUDA, 1, 1, "fastvlp") is None
    assert "needs a CUDA device" in cuda_graph_problem(torch.device("cpu"), 1, 1, "fastvlp")
    assert "--grad-accum must be 1" in cuda_graph_problem(CUDA, 2, 1, "fastvlp")
    assert "one process" in cuda_graph_problem(CUDA, 1, 2, "fastvlp")
    assert "--matcher-backend fastvlp" in cuda_graph_problem(CUDA, 1, 1, "scipy")
    assert "no fixed-shape batches" in cuda_graph_problem(CUDA, 1, 1, "fastvlp", has_fixed_shapes=False)
    for problem in (cuda_graph_problem(torch.device("cpu"), 1, 1, "fastvlp"), cuda_graph_problem(CUDA, 2, 1, "x")):
        assert problem.startswith("cuda_graph: ")


def test_pretrain_options_refuse_cuda_graph_on_the_cpu(tmp_path):
    data = write_corpus(tmp_path, num_images=4)
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
        small_options(data, tmp_path / "run", cuda_graph=True).validate()
    with pytest.raises(ValueError, match="max_targets"):
        small_options(data, tmp_path / "run", max_targets=0).validate()


def test_fixed_shape_batches_pad_to_the_scale_and_refuse_crowded_images():
    torch.manual_seed(0)
    config = get_preset("tiny", matcher_backend="fastvlp")
    model = E2EVLP(config)
    batch = synthetic_batch(config, 4, 64, 96, torch.Generator().manual_seed(2), "cpu")
    largest = max(len(target["labels"]) for target in batch.targets)
    fixed = fixed_shape_batches(model, "tiny", largest)(batch)
    assert fixed.images.shape[2:] == (160, 160) and fixed.input_ids.shape[1] == config.max_text_len
    assert fixed.padded_targets.labels.shape[1] == largest
    assert fixed.targets is None  # the graph reads the padded targets only: the per-image dicts are not copied
    assert fixed.images.device == next(model.parameters()).device
    assert fixed_shape_batches(model, "tiny", largest - 1)(batch) is None


class _FakeCapture:
    """Stands in for CapturedTrainingStep: replays accept batches of the first batch's image shape."""
    made = 0

    def __init__(self, model, optimizer, example, **kwargs):
        assert optimizer is None  # the loop steps the optimizer itself
        _FakeCapture.made += 1
        self.shape, self.grad_norm = example.shape, torch.tensor(1.0)

    def accepts(self, batch):
        return batch.shape == self.shape

    def step(self, batch):
        return "output"


def test_graph_steps_capture_once_and_count_fallbacks(monkeypatch):
    monkeypatch.setattr(graph_steps, "CapturedTrainingStep", _FakeCapture)
    _FakeCapture.made = 0
    steps = GraphSteps(None, lambda batch: None if batch.shape[0] > 3 else batch, clip_max_norm=0.1, amp=True)
    assert steps.run(torch.zeros(5)) is None and steps.captured is None  # does not fit: nothing captured yet
    output, norm = steps.run(torch.zeros(2))
    assert output == "output" and float(norm) == 1.0
    assert steps.run(torch.zeros(3)) is None  # fits the fixed shapes but not the captured ones
    assert steps.run(torch.zeros(2)) is not None
    assert (_FakeCapture.made, steps.replays, steps.fallbacks) == (1, 2, 2)


@pytest.mark.cuda
def test_cuda_graph_pretraining_stops_resumes_and_logs(tmp_path):
    data = write_corpus(tmp_path)
    out = tmp_path / "run"
    common = dict(device="cuda", cuda_graph=True, max_targets=20, max_steps=4, save_every=2)
    first = run_pretraining(small_options(data, out, stop_after=2, **common))
    assert first.step == 2
    second = run_pretraining(small_options(data, out, resume=True, **common))
    assert second.step == 4
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert math.isfinite(record["loss"]) and record["cuda_graph_fallbacks"] == 0
        assert record["loss"] == pytest.approx(record["loss_mlm"] + record["loss_itm"] + (record["loss_det"] or 0.0)
                                               + record["loss_cap"], rel=1e-4)
    # A crowded image (more objects than --max-targets) runs its batch eagerly, counted.
    crowded = run_pretraining(small_options(data, tmp_path / "crowded", **{**common, "max_targets": 1}))
    assert read_metrics(crowded.metrics_path)[-1]["cuda_graph_fallbacks"] > 0


def test_pad_to_sets_the_canvas_and_is_checked(tmp_path):
    torch.manual_seed(0)
    model = E2EVLP(get_preset("tiny", matcher_backend="fastvlp"))
    batch = synthetic_batch(model.config, 2, 64, 96, torch.Generator().manual_seed(2), "cpu")
    largest = max(len(target["labels"]) for target in batch.targets)
    assert fixed_shape_batches(model, "tiny", largest, (64, 128))(batch).images.shape[2:] == (64, 128)
    assert fixed_shape_batches(model, "tiny", largest, (48, 128))(batch) is None  # an image taller than the canvas
    data = write_corpus(tmp_path, num_images=4)
    with pytest.raises(ValueError, match="pad_to"):
        small_options(data, tmp_path / "run", pad_to=(64, 0)).validate()


def test_height_width_parsing():
    from fastvlp.cli import parse_height_width

    assert parse_height_width("800x1333") == (800, 1333) and parse_height_width("64X96") == (64, 96)
    for text in ("800", "axb", "1x2x3", "x5", ""):
        with pytest.raises(ValueError, match="expected HxW"):
            parse_height_width(text)
