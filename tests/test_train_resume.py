"""``--resume`` takes the run's settings from its checkpoint and refuses a call that would change them:
the model configuration (only the backends may change), the schedule and batch settings, the corpus (data
folder, exclusion file, size), the tokenizer and weights, the fine-tuned task; and it clears what an
interrupted checkpoint write left (short CPU runs of a very small model)."""
import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.models.resnet import BasicBlock, ResNet
from train_helpers import SMALL_MODEL, SMALL_SCALE, small_options

from fastvlp.cli import main as cli_main
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.train import loop
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
    # a checkpoint written before trainer_state.json recorded the warm-up and the corpus (and without
    # preset.json) resumes, even on another data folder
    out = tmp_path / "run"
    run_pretraining(pretrain_options(data, out, stop_after=1))
    step1 = list_checkpoints(out)[-1]
    state = json.loads((step1 / "trainer_state.json").read_text())
    for key in ("warmup_steps", "data", "exclude_images_sha256", "corpus_size"):
        del state[key]
    (step1 / "trainer_state.json").write_text(json.dumps(state))
    (step1 / "preset.json").unlink()
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    result = run_pretraining(pretrain_options(moved, out, resume=True, warmup_steps=0))
    assert result.step == 2


def test_the_checkpoint_records_the_corpus(data, finished):
    trainer = json.loads((finished.checkpoint / "trainer_state.json").read_text())
    run_info = json.loads((finished.run_dir / "run.json").read_text())
    assert trainer["data"] == str(data.resolve()) and trainer["exclude_images_sha256"] is None
    assert trainer["corpus_size"] == run_info["images"] > 0 and run_info["exclusion"] == {}


def test_another_corpus_on_resume_is_refused_naming_the_option(data, finished, tmp_path):
    before = finished.metrics_path.read_text()
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    with pytest.raises(ValueError, match=re.escape(f"--data: the run was started with {data.resolve()}, this call "
                                                   f"gives {moved.resolve()}; its sampler position indexes that corpus")):
        run_pretraining(pretrain_options(moved, finished.run_dir, resume=True))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("no_such_image.jpg\n")
    digest = hashlib.sha256(exclude.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"^--exclude-images: the run was started with no --exclude-images file, "
                                         f"this call gives an --exclude-images file of SHA-256 {digest}"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, exclude_images=exclude))
    assert finished.metrics_path.read_text() == before


def test_another_exclusion_file_or_corpus_size_on_resume_is_refused(data, tmp_path):
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("no_such_image.jpg\n")
    out = tmp_path / "run"
    run_pretraining(pretrain_options(data, out, stop_after=1, exclude_images=exclude))
    digest = hashlib.sha256(exclude.read_bytes()).hexdigest()
    exclude.write_text("no_such_image.jpg\n1.jpg\n")
    with pytest.raises(ValueError, match=f"^--exclude-images: the run was started with an --exclude-images file of "
                                         f"SHA-256 {digest}, this call gives an --exclude-images file of SHA-256 "):
        run_pretraining(pretrain_options(data, out, resume=True, exclude_images=exclude))
    with pytest.raises(ValueError, match="^--exclude-images: .* this call gives no --exclude-images file"):
        run_pretraining(pretrain_options(data, out, resume=True))
    exclude.write_text("no_such_image.jpg\n")
    # the same folder and list, but the folder's contents changed since
    step1 = list_checkpoints(out)[-1]
    state = json.loads((step1 / "trainer_state.json").read_text())
    size, state["corpus_size"] = state["corpus_size"], state["corpus_size"] + 1
    (step1 / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"^--data: the run was started with {size + 1} training images, this call "
                                         f"gives {size} training images"):
        run_pretraining(pretrain_options(data, out, resume=True, exclude_images=exclude))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_on_resume_another_vocab_is_refused_and_the_same_command_line_resumes(data, finished, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a")))
    with pytest.raises(ValueError, match=r"^--vocab: .*vocab.txt is not the vocabulary of the run's tokenizer; leave "
                                         r"it out \(the run's tokenizer is restored from .*step-2\)"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, vocab=vocab))
    # The vocabulary the run started with, and backbone weights (not read: the checkpoint holds the weights),
    # resume: the command line that started the run also resumes it.
    weights = tmp_path / "resnet10.safetensors"
    save_file(ResNet(BasicBlock, [1, 1, 1, 1]).state_dict(), str(weights))  # weights that fit the preset
    from fastvlp.data.tokenizer import WordPieceTokenizer

    run_vocab = WordPieceTokenizer.load(finished.checkpoint / "tokenizer.json").backend.get_vocab()
    same = tmp_path / "same_vocab.txt"
    same.write_text("".join(t + "\n" for t, _ in sorted(run_vocab.items(), key=lambda item: item[1])))
    result = run_pretraining(pretrain_options(data, finished.run_dir, resume=True, backbone_weights=weights,
                                              vocab=same))
    assert result.step == finished.step
    assert f"--backbone-weights {weights} is not read" in (finished.run_dir / "train.log").read_text()


def test_a_checkpoint_of_the_triton_backend_resumes_on_the_cpu_only_with_the_interpreter(data, finished, tmp_path,
                                                                                         monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished.run_dir, out)
    config = json.loads((out / "checkpoints" / "step-2" / "config.json").read_text())
    (out / "checkpoints" / "step-2" / "config.json").write_text(json.dumps({**config, "attention_backend": "triton"}))
    monkeypatch.setattr(loop, "triton_interpreter_problem", lambda: "the interpreter is off: set TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match=r"^attention_backend: 'triton' on the CPU expects Triton's interpreter"):
        run_pretraining(pretrain_options(data, out, resume=True, config_overrides={}))
    # another backend given on resume replaces the checkpoint's
    assert run_pretraining(pretrain_options(data, out, resume=True, config_overrides={}, attention_backend="torch")).step == 2


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


def test_another_scale_on_resume_is_refused_and_a_missing_one_is_the_runs(data, finished, tmp_path):
    before = finished.metrics_path.read_text()
    with pytest.raises(ValueError, match=r"^--scale: the run was trained at \{'short_sides': \[64, 72\], "
                                         r"'max_size': 96, 'eval_short_side': 64\}, this call gives 'tiny'"):
        run_pretraining(pretrain_options(data, finished.run_dir, resume=True, scale="tiny"))
    assert finished.metrics_path.read_text() == before
    # left out, the scale is the run's: the resumed run ends with the straight run's weights
    out = tmp_path / "run"
    run_pretraining(pretrain_options(data, out, stop_after=1))
    resumed = run_pretraining(pretrain_options(data, out, resume=True, scale=None))
    a = load_file(str(finished.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert resumed.step == finished.step == 2 and all(torch.equal(a[k], b[k]) for k in a)
