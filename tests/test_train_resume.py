"""``--resume`` takes the run's settings from its checkpoint and refuses a call that would change them:
the model configuration (only the backends may change), the schedule and batch settings, the fine-tuned
task; and it clears what an interrupted checkpoint write left (short CPU runs of a very small model)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import SMALL_MODEL, SMALL_SCALE, small_options

from fastvlp.cli import main as cli_main
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.train.checkpoint import list_checkpoints
from fastvlp.train.finetune import FinetuneOptions, run_finetuning
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.pretrain import run_pretraining


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "data"
    write_synthetic_dataset(root, 12, seed=2, datasets=("coco", "vg", "vqa"))
    return root


def pretrain_options(data, out, **changes):
    return small_options(data, out, **{"max_steps": 2, "vocab": None, **changes})


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 2-step pre-training run of the small model (``--set`` overrides of the tiny preset)."""
    return run_pretraining(pretrain_options(data, tmp_path_factory.mktemp("finished") / "run"))


def test_resume_without_the_set_flags_continues_the_checkpoints_model(data, tmp_path):
    out = tmp_path / "run"
    first = run_pretraining(pretrain_options(data, out, stop_after=1))
    assert first.step == 1
    # neither --set nor anything else about the model: all of it comes from the checkpoint; a backend may change
    result = run_pretraining(pretrain_options(data, out, resume=True, config_overrides={}, attention_backend="torch"))
    assert result.step == 2 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert {k: config[k] for k in SMALL_MODEL} == SMALL_MODEL and config["attention_backend"] == "torch"
    assert json.loads((out / "run.json").read_text())["config"]["attention_backend"] == "torch"
    trainer = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert trainer["seed"] == 3 and trainer["warmup_steps"] == 1 and trainer["max_steps"] == 2


def test_a_model_change_on_resume_is_refused_naming_the_option(data, finished):
    before = finished.metrics_path.read_text()
    with pytest.raises(ValueError, match=r"--set d_model=64: .* d_model=32"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, config_overrides={**SMALL_MODEL, "d_model": 64}))
    with pytest.raises(ValueError, match=r"--set num_queries"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, config_overrides={"num_queries": 7}))
    with pytest.raises(ValueError, match=r"--preset: .*'tiny'.*'e2e-vlp-6-r50'"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, preset="e2e-vlp-6-r50"))
    assert finished.metrics_path.read_text() == before
    # the same values again, and another matcher, are no change to the model
    again = run_pretraining(pretrain_options(data, finished.run_dir, resume=True, matcher_backend="scipy"))
    assert again.step == 2 and finished.metrics_path.read_text() == before


@pytest.mark.parametrize("change, option", [
    ({"seed": 4}, "--seed"),
    ({"warmup_steps": 0}, "--warmup-steps"),
    ({"max_steps": 3}, "--max-steps"),
    ({"batch_size": 3}, "--batch-size"),
    ({"grad_accum": 2}, "--grad-accum"),
])
def test_other_schedule_or_batch_settings_on_resume_are_refused(data, finished, change, option):
    before = finished.metrics_path.read_text()
    with pytest.raises(ValueError, match=f"^{option}: the run was started with"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, **change))
    assert finished.metrics_path.read_text() == before


def test_the_default_warmup_given_explicitly_and_a_checkpoint_without_it_resume(data, finished, tmp_path):
    assert run_pretraining(pretrain_options(data, finished.run_dir, resume=True, warmup_steps=1)).step == 2
    # a checkpoint written before trainer_state.json recorded the warm-up (and without preset.json) resumes
    out = tmp_path / "run"
    run_pretraining(pretrain_options(data, out, stop_after=1))
    step1 = list_checkpoints(out)[-1]
    state = json.loads((step1 / "trainer_state.json").read_text())
    del state["warmup_steps"]
    (step1 / "trainer_state.json").write_text(json.dumps(state))
    (step1 / "preset.json").unlink()
    result = run_pretraining(pretrain_options(data, out, resume=True, warmup_steps=0))
    assert result.step == 2


def test_resume_clears_interrupted_writes_and_restores_a_replaced_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    run_pretraining(pretrain_options(data, out, stop_after=1))
    root = out / "checkpoints"
    weights = load_file(str(root / "step-1" / "model.safetensors"))
    # a crash between the two renames of a write that replaced step-1, and the directory it was filling
    (root / "step-1").rename(root / ".old-step-1-4242")
    (root / ".tmp-step-1-4242").mkdir()
    (root / ".tmp-step-1-4242" / "model.safetensors").write_bytes(b"partial")
    result = run_pretraining(pretrain_options(data, out, resume=True))
    assert result.step == 2 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]
    restored = load_file(str(root / "step-1" / "model.safetensors"))
    assert all(torch.equal(weights[k], restored[k]) for k in weights)
    assert "resuming from" in (out / "train.log").read_text() and ".old-step-1-4242" in (out / "train.log").read_text()


def vqa_options(data, out, **changes):
    values = dict(task="vqa", preset="tiny", data=data, out=out, max_steps=2, batch_size=2, seed=1, progress=False,
                  scale=SMALL_SCALE, config_overrides=dict(SMALL_MODEL), device="cpu", task_options={"num_answers": 4})
    values.update(changes)
    return FinetuneOptions(**values)


@pytest.fixture(scope="module")
def vqa_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa") / "run"
    assert run_finetuning(vqa_options(data, out, stop_after=1)).step == 1
    return out


def test_finetune_resume_refuses_another_task_lr_or_model(data, vqa_run, capsys):
    with pytest.raises(ValueError, match=r"^--task: the run fine-tunes 'vqa', this call gives 'caption'"):
        run_finetuning(vqa_options(data, vqa_run, task="caption", task_options={}, resume=True))
    with pytest.raises(ValueError, match=r"^--lr: "):
        run_finetuning(vqa_options(data, vqa_run, lr=1e-3, resume=True))
    with pytest.raises(ValueError, match=r"^--set d_model=64"):
        run_finetuning(vqa_options(data, vqa_run, config_overrides={"d_model": 64}, resume=True))
    with pytest.raises(ValueError, match=r"^--seed: "):
        run_finetuning(vqa_options(data, vqa_run, seed=2, resume=True))
    # a smaller answer vocabulary would not fit the run's classifier
    with pytest.raises(ValueError, match=r"^--resume: the task state .* differs from the run's in \['answer_prior', 'answers'\]"):
        run_finetuning(vqa_options(data, vqa_run, task_options={"num_answers": 3}, resume=True))
    assert [r["step"] for r in read_metrics(vqa_run / "metrics.jsonl")] == [1]
    # the command reports the refusal, without a traceback
    overrides = [f"--set={name}={value}" for name, value in SMALL_MODEL.items()]
    code = cli_main(["finetune", "--task", "caption", "--preset", "tiny", "--data", str(data), "--out", str(vqa_run),
                     "--resume", "--max-steps", "2", "--batch-size", "2", "--seed", "1", "--device", "cpu",
                     "--no-progress", *overrides])
    assert code == 1 and "--task: the run fine-tunes 'vqa'" in capsys.readouterr().err


def test_finetune_resume_keeps_the_checkpoints_model_and_may_change_its_backend(data, vqa_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(vqa_run, out)
    result = run_finetuning(vqa_options(data, out, config_overrides={}, attention_backend="torch", resume=True))
    assert result.step == 2 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["d_model"] == SMALL_MODEL["d_model"] and config["attention_backend"] == "torch"
