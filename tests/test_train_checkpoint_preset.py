"""A pre-training checkpoint directory is self-contained: it records the preset its model came from and the
image scale it was trained at, which the tasks fine-tuned from it keep, so a copy of ``step-N`` outside its
run keeps its scale; checkpoints written before it held ``preset.json`` fall back to their run's ``run.json``
for the preset, and to the preset's default scale."""
import json
import shutil

import pytest
from train_helpers import SMALL_MODEL, SMALL_SCALE, small_options

from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.inference import Predictor
from fastvlp.data.transforms import scale_record
from fastvlp.train.checkpoint import checkpoint_preset, checkpoint_scale
from fastvlp.train.finetune import FinetuneOptions, run_finetuning, source_preset, source_scale
from fastvlp.train.pretrain import run_pretraining


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset") / "data"
    write_synthetic_dataset(root, 12, seed=4, datasets=("coco", "vg", "vqa"))
    return root


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    return run_pretraining(small_options(data, tmp_path_factory.mktemp("pretrain") / "run", max_steps=1, vocab=None))


def vqa_from(init, data, out, **changes):
    return run_finetuning(FinetuneOptions(
        task="vqa", init=init, data=data, out=out, max_steps=1, batch_size=2, progress=False, device="cpu",
        task_options={"num_answers": 4}, **changes,
    ))


def test_the_checkpoint_records_its_preset_and_scale(pretrained):
    assert json.loads((pretrained.checkpoint / "preset.json").read_text()) == {"preset": "tiny",
                                                                               "scale": scale_record(SMALL_SCALE)}
    assert checkpoint_preset(pretrained.checkpoint) == "tiny" == source_preset(pretrained.checkpoint)
    assert checkpoint_scale(pretrained.checkpoint) == scale_record(SMALL_SCALE)
    assert source_scale(pretrained.checkpoint) == SMALL_SCALE


def test_a_copied_step_directory_keeps_its_scale(data, pretrained, tmp_path):
    copied = tmp_path / "elsewhere" / "step-1"
    shutil.copytree(pretrained.checkpoint, copied)
    assert not (copied.parent.parent / "run.json").exists()
    assert source_preset(copied) == "tiny"
    result = vqa_from(copied, data, tmp_path / "vqa")  # no scale given: the checkpoint's is kept
    task_file = json.loads((result.checkpoint / "task.json").read_text())
    assert task_file["preset"] == "tiny" and task_file["scale"] == scale_record(SMALL_SCALE)
    assert json.loads((result.run_dir / "run.json").read_text())["preset"] == "tiny"
    predictor = Predictor.from_checkpoint(result.checkpoint, device="cpu")
    assert predictor.scale == SMALL_SCALE and predictor.model.config.d_model == SMALL_MODEL["d_model"]
    # fine-tuning from that fine-tuned checkpoint keeps it too
    assert source_scale(result.checkpoint) == SMALL_SCALE


def test_a_given_scale_replaces_the_checkpoints(data, pretrained, tmp_path):
    result = vqa_from(pretrained.checkpoint, data, tmp_path / "vqa", scale="tiny")
    assert json.loads((result.checkpoint / "task.json").read_text())["scale"] == "tiny"


def test_an_older_checkpoint_falls_back_to_its_runs_file(data, pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained.run_dir, run)
    step = run / "checkpoints" / pretrained.checkpoint.name
    (step / "preset.json").unlink()
    assert checkpoint_preset(step) == "tiny"
    # the scale it was trained at is not recorded: the preset's default is the best guess
    assert checkpoint_scale(step) is None and source_scale(step) == "tiny"
    result = vqa_from(step, data, tmp_path / "vqa")
    assert json.loads((result.checkpoint / "task.json").read_text())["scale"] == "tiny"
    # copied away from its run, such a checkpoint cannot tell
    alone = tmp_path / "alone" / "step-1"
    shutil.copytree(step, alone)
    assert checkpoint_preset(alone) is None and source_preset(alone) is None
    assert source_scale(alone) == "paper"


@pytest.mark.parametrize("record, message", [
    ("huge", r"'scale' must be one of \['paper', 'tiny'\] or the fields of ScaleConfig, got 'huge'"),
    ({"short_sides": [64], "max_size": 32, "eval_short_side": 32},
     r"'scale' holds an invalid ScaleConfig \(max_size: expected an int >= the largest short side"),
])
def test_a_malformed_recorded_scale_is_refused_naming_the_file(pretrained, tmp_path, record, message):
    step = tmp_path / "step-1"
    shutil.copytree(pretrained.checkpoint, step)
    (step / "preset.json").write_text(json.dumps({"preset": "tiny", "scale": record}))
    with pytest.raises(ValueError, match=f"^{step / 'preset.json'}: {message}"):
        source_scale(step)
