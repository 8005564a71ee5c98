"""A pre-training checkpoint directory is self-contained: it records the preset its model came from (which
decides the image scale of the tasks fine-tuned from it), so a copy of ``step-N`` outside its run keeps the
tiny preset's scale; checkpoints written before it held ``preset.json`` fall back to their run's ``run.json``."""
import json
import shutil

import pytest
from train_helpers import SMALL_MODEL, small_options

from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.inference import Predictor
from fastvlp.train.checkpoint import checkpoint_preset
from fastvlp.train.finetune import FinetuneOptions, run_finetuning, source_preset
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


def test_the_checkpoint_records_its_preset(pretrained):
    assert json.loads((pretrained.checkpoint / "preset.json").read_text()) == {"preset": "tiny"}
    assert checkpoint_preset(pretrained.checkpoint) == "tiny" == source_preset(pretrained.checkpoint)


def test_a_copied_step_directory_keeps_the_tiny_scale(data, pretrained, tmp_path):
    copied = tmp_path / "elsewhere" / "step-1"
    shutil.copytree(pretrained.checkpoint, copied)
    assert not (copied.parent.parent / "run.json").exists()
    assert source_preset(copied) == "tiny"
    result = run_finetuning(FinetuneOptions(
        task="vqa", init=copied, data=data, out=tmp_path / "vqa", max_steps=1, batch_size=2, progress=False,
        device="cpu", task_options={"num_answers": 4},
    ))  # no scale given: the preset's decides it
    assert json.loads((result.checkpoint / "task.json").read_text())["preset"] == "tiny"
    assert json.loads((result.run_dir / "run.json").read_text())["preset"] == "tiny"
    predictor = Predictor.from_checkpoint(result.checkpoint, device="cpu")
    assert json.loads((result.checkpoint / "task.json").read_text())["scale"] == "tiny"
    assert predictor.scale == "tiny" and predictor.model.config.d_model == SMALL_MODEL["d_model"]


def test_an_older_checkpoint_falls_back_to_its_runs_file(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained.run_dir, run)
    step = run / "checkpoints" / pretrained.checkpoint.name
    (step / "preset.json").unlink()
    assert checkpoint_preset(step) == "tiny"
    # copied away from its run, such a checkpoint cannot tell
    alone = tmp_path / "alone" / "step-1"
    shutil.copytree(step, alone)
    assert checkpoint_preset(alone) is None and source_preset(alone) is None
