"""The fine-tuning driver (``run_finetuning``): bit-identical resume, starting from a pre-training
checkpoint, refusing an existing run, option errors and the default learning-rate schedules (short CPU runs
of a very small model on a small synthetic set)."""
import json
import re
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import SMALL_MODEL, SMALL_SCALE, small_options

from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import ScaleConfig
from fastvlp.inference import Predictor
from fastvlp.train.checkpoint import list_checkpoints
from fastvlp.train.finetune import FinetuneOptions, default_task_lr, run_finetuning, saved_scale, saved_task_state
from fastvlp.train.loop import RunExistsError
from fastvlp.train.metrics_log import read_metrics
from fastvlp.train.pretrain import run_pretraining
from fastvlp.train.tasks import get_task

TINY_LR = 5e-4  # tiny pre-trains its Transformer and backbone at one rate, 5e-4
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 synthetic images: coco + vg (pre-training), vqa, flickr30k; and a vocab.txt of the VQA questions
    (runs that are compared share it: the WordPiece trainer's ties differ from run to run)."""
    root = tmp_path_factory.mktemp("finetune")
    write_synthetic_dataset(root / "data", 24, seed=0, datasets=("coco", "vg", "vqa", "flickr30k"))
    task = get_task("vqa")
    records = task.read_training_data(root / "data", {}).records
    vocab = WordPieceTokenizer.train_on_texts(task.tokenizer_texts(records)).backend.get_vocab()
    (root / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    return root / "data"


def vqa_options(data, out, **changes):
    values = dict(task="vqa", preset="tiny", data=data, out=out, max_steps=4, batch_size=4, seed=1, progress=False,
                  scale=SMALL_SCALE, config_overrides=dict(SMALL_MODEL), device="cpu", vocab=data.parent / "vocab.txt",
                  task_options={"num_answers": 8})
    values.update(changes)
    return FinetuneOptions(**values)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    return run_finetuning(vqa_options(data, tmp_path_factory.mktemp("straight") / "run"))


def test_stop_after_then_resume_is_bitwise_equal_to_a_straight_run(data, straight, tmp_path):
    out = tmp_path / "run"
    first = run_finetuning(vqa_options(data, out, stop_after=2))
    assert first.step == 2 and [p.name for p in list_checkpoints(out)] == ["step-2"]
    second = run_finetuning(vqa_options(data, out, resume=True))
    assert second.step == 4 and straight.step == 4
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(straight.checkpoint / name)), load_file(str(second.checkpoint / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (second.checkpoint / "task.json").read_text() == (straight.checkpoint / "task.json").read_text()
    records, reference = read_metrics(out / "metrics.jsonl"), read_metrics(straight.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [(r["loss"], r["lr"]) for r in records] == [(r["loss"], r["lr"]) for r in reference]
    # the first half trained: its weights differ from the end's
    half = load_file(str(first.checkpoint / "model.safetensors"))
    end = load_file(str(second.checkpoint / "model.safetensors"))
    assert not torch.equal(half["head.classifier.output.weight"], end["head.classifier.output.weight"])


def test_checkpoint_task_file_and_metrics(straight, data):
    saved = json.loads((straight.checkpoint / "task.json").read_text())
    task_state = get_task("vqa").read_training_data(data, {"num_answers": 8}).task_state
    assert saved == {"task": "vqa", "preset": "tiny", "pretraining_rates": [TINY_LR, TINY_LR],
                     "scale": json.loads(json.dumps(asdict(SMALL_SCALE))), **task_state}
    assert set(task_state) == {"answers", "answer_prior"}
    for record in read_metrics(straight.metrics_path):
        assert record["loss"] > 0 and record["loss"] == pytest.approx(record["loss_vqa"], rel=1e-6)
    run_info = json.loads((straight.run_dir / "run.json").read_text())
    assert run_info["task"] == "vqa" and run_info["config"]["d_model"] == SMALL_MODEL["d_model"]


def test_the_fine_tuning_scale_is_what_inference_and_resume_use(data, straight, tmp_path):
    predictor = Predictor.from_checkpoint(straight.checkpoint, device="cpu")
    assert predictor.scale == SMALL_SCALE
    assert predictor.transform.short_sides == (SMALL_SCALE.eval_short_side,)
    assert predictor.transform.max_size == SMALL_SCALE.max_size
    out = tmp_path / "run"
    run_finetuning(vqa_options(data, out, stop_after=2))
    other = ScaleConfig(short_sides=(64,), max_size=96, eval_short_side=64)
    with pytest.raises(ValueError, match="scale"):
        run_finetuning(vqa_options(data, out, resume=True, scale=other))
    # Left out, the scale comes from the run: the resumed run ends where the straight one does.
    resumed = run_finetuning(vqa_options(data, out, resume=True, scale=None))
    a, b = load_file(str(straight.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_scale_of_older_and_malformed_task_files():
    assert saved_scale({"task": "vqa", "preset": "tiny"}) == "tiny"
    assert saved_scale({"task": "vqa", "preset": "e2e-vlp-6-r50"}) == "paper"
    assert saved_scale({"scale": asdict(SMALL_SCALE)}) == SMALL_SCALE
    with pytest.raises(ValueError, match="scale"):
        saved_scale({"scale": {"short_sides": [64]}})
    assert "scale" not in saved_task_state({"task": "vqa", "scale": "tiny", "answers": ["a"]})


def test_default_lr_steps_down_at_half_and_three_quarters(straight):
    """VQA's paper rate 1e-4 as it is (VQA does not scale it with tiny's faster pre-training), the backbone's
    at tiny's ratio of 1; x0.1 after 6/12 and 9/12 of the 4 steps, i.e. once 2 and 3 updates are done (a
    step's metrics line shows the rate it used)."""
    lr = 1e-4
    records = read_metrics(straight.metrics_path)
    assert [r["lr"] for r in records] == pytest.approx([lr, lr, lr / 10, lr / 100], rel=1e-9)
    assert [r["lr_backbone"] for r in records] == pytest.approx([lr, lr, lr / 10, lr / 100], rel=1e-9)  # tiny's ratio 1
    config = json.loads((straight.run_dir / "run.json").read_text())["config"]
    assert config["lr"] == pytest.approx(lr) and config["lr_backbone"] == pytest.approx(lr)


@pytest.mark.parametrize("task, tiny_lr", [("vqa", 1e-4), ("nlvr2", 5e-4), ("caption", 5e-4), ("detection", 5e-4),
                                            ("retrieval", 2.5e-4)])
def test_default_task_rates(task, tiny_lr):
    """Each task's paper rate, scaled x5 from tiny's pre-training rate (5e-4 over the paper's 1e-4), except
    VQA's, which stays the paper's; after a paper preset's pre-training (1e-4) every rate is the paper's."""
    assert default_task_lr(get_task(task), TINY_LR) == pytest.approx(tiny_lr, rel=1e-12)
    assert default_task_lr(get_task(task), 1e-4) == pytest.approx(get_task(task).paper_lr, rel=1e-12)


def test_retrieval_default_lr_warms_up(data, tmp_path):
    """Retrieval: the paper's 5e-5 scaled like tiny's pre-training rate (x5), with linear warm-up (10% of
    20 steps) and decay."""
    options = FinetuneOptions(task="retrieval", preset="tiny", data=data, out=tmp_path / "run", max_steps=20,
                              stop_after=2, batch_size=3, progress=False, scale=SMALL_SCALE, device="cpu",
                              config_overrides=dict(SMALL_MODEL), vocab=data.parent / "vocab.txt",
                              task_options={"num_negatives": 2})
    result = run_finetuning(options)
    lr = 5e-5 * TINY_LR / 1e-4
    assert result.step == 2
    assert [r["lr"] for r in read_metrics(result.metrics_path)] == pytest.approx([lr / 2, lr], rel=1e-9)


def test_an_existing_run_is_refused_without_resume(data, straight):
    before = straight.metrics_path.read_text()
    with pytest.raises(RunExistsError, match="--resume"):
        run_finetuning(vqa_options(data, straight.run_dir))
    assert straight.metrics_path.read_text() == before


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    result = run_pretraining(small_options(data, tmp_path_factory.mktemp("pretrain") / "run", max_steps=1, vocab=None))
    return result.checkpoint


def test_init_from_a_pretraining_checkpoint(data, pretrained, tmp_path):
    # A vanishing rate leaves every trained weight as loaded, so the saved weights show what the init loaded.
    result = run_finetuning(vqa_options(data, tmp_path / "run", preset=None, init=pretrained, max_steps=1, lr=1e-50,
                                        config_overrides={}, vocab=None))
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert report["init"] == str(pretrained) and report["loaded"] > 0 and report["mismatched"] == []
    assert report["new"] and all(key.startswith("head.") for key in report["new"])
    assert "head.classifier.output.weight" in report["new"]
    assert any(key.startswith("vlp.decoder.") for key in report["unused"])
    assert not any(key.startswith(("vlp.encoder.", "vlp.backbone.", "vlp.text_embeddings.")) for key in report["unused"])

    before = load_file(str(pretrained / "model.safetensors"))
    after = load_file(str(result.checkpoint / "model.safetensors"))
    compared = 0
    for key, value in after.items():
        if key.startswith(("vlp.encoder.", "vlp.backbone.", "vlp.text_embeddings.")) and not key.endswith(BN_BUFFERS):
            source = key[len("vlp."):]
            if source in before:  # a tied weight is stored under one name
                assert torch.equal(value, before[source]), key
                compared += 1
    assert compared > 20
    assert any(k.startswith("vlp.encoder.") for k in after) and not any(k.startswith("vlp.decoder.") for k in after)

    saved = json.loads((result.checkpoint / "task.json").read_text())
    assert saved["task"] == "vqa" and saved["preset"] == "tiny" and saved["pretraining_rates"] == [TINY_LR, TINY_LR]
    assert saved["answers"] == get_task("vqa").read_training_data(data, {"num_answers": 8}).task_state["answers"]
    # the checkpoint's tokenizer and configuration came with it
    assert (result.checkpoint / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["d_model"] == SMALL_MODEL["d_model"] and config["lr"] == 1e-50  # an explicit lr replaces the default


def test_option_errors(data, tmp_path):
    out = tmp_path / "run"

    def options(**changes):
        values = dict(task="vqa", preset="tiny", data=data, out=out)
        values.update(changes)
        return FinetuneOptions(**values)

    with pytest.raises(ValueError, match="task"):
        run_finetuning(options(task="captioning"))
    with pytest.raises(ValueError, match="init, preset"):
        run_finetuning(options(init=tmp_path))
    with pytest.raises(ValueError, match="init, preset"):
        run_finetuning(options(preset=None))
    with pytest.raises(ValueError, match="preset"):
        run_finetuning(options(preset="huge"))
    with pytest.raises(FileNotFoundError, match="init"):
        run_finetuning(options(preset=None, init=tmp_path))  # no config.json: not a checkpoint
    with pytest.raises(FileNotFoundError, match="data"):
        run_finetuning(options(data=tmp_path / "missing"))
    with pytest.raises(ValueError, match="lr"):
        run_finetuning(options(lr=0.0))
    with pytest.raises(ValueError, match="max_steps"):
        run_finetuning(options(max_steps=0))
    with pytest.raises(FileNotFoundError, match="vocab"):
        run_finetuning(options(vocab=tmp_path / "vocab.txt"))
    with pytest.raises(TypeError, match="options"):
        run_finetuning({"task": "vqa"})
    assert not out.exists()  # nothing was started
    defaults = options()
    defaults.validate()
    assert defaults.max_steps == get_task("vqa").default_max_steps == 3000


def test_resume_needs_no_init_directory_and_refuses_another_start(data, pretrained, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(pretrained, init)
    out = tmp_path / "run"

    def init_options(**changes):
        values = {"preset": None, "init": init, "config_overrides": {}, "vocab": None, **changes}
        return vqa_options(data, out, **values)

    assert run_finetuning(init_options(stop_after=1)).step == 1
    shutil.rmtree(init)  # the pre-training run moved: resuming reads nothing from it
    started = re.escape(f"the run was started from --init {init}, this call gives")
    with pytest.raises(ValueError, match=rf"^--init: {started} --init {re.escape(str(pretrained))};"):
        run_finetuning(init_options(init=pretrained, resume=True))
    with pytest.raises(ValueError, match=rf"^--preset: {started} --preset tiny;"):
        run_finetuning(vqa_options(data, out, config_overrides={}, vocab=None, resume=True))
    with pytest.raises(ValueError, match="^vocab: expected only with preset"):
        run_finetuning(init_options(vocab=data.parent / "vocab.txt", resume=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert run_finetuning(init_options(resume=True)).step == 4
    # with no checkpoint to resume, --resume starts the run, which needs the init directory
    with pytest.raises(FileNotFoundError, match="^init: .* is not a checkpoint directory"):
        run_finetuning(vqa_options(data, tmp_path / "fresh", preset=None, init=init, config_overrides={}, vocab=None,
                                   resume=True))


def test_resume_refuses_another_preset_init_or_vocab(data, tmp_path):
    out = tmp_path / "run"
    assert run_finetuning(vqa_options(data, out, stop_after=1)).step == 1
    with pytest.raises(ValueError, match=r"^--preset: the run was started from --preset tiny, this call gives "
                                         r"--preset e2e-vlp-6-r50;"):
        run_finetuning(vqa_options(data, out, preset="e2e-vlp-6-r50", resume=True))
    other_init = tmp_path / "other"
    other_init.mkdir()  # need not be a checkpoint: the refusal comes first
    with pytest.raises(ValueError, match=r"^--init: the run was started from --preset tiny, this call gives "):
        run_finetuning(vqa_options(data, out, preset=None, init=other_init, vocab=None, resume=True))
    other_vocab = tmp_path / "vocab.txt"
    other_vocab.write_text((data.parent / "vocab.txt").read_text() + "zebra\n")
    with pytest.raises(ValueError, match=r"^--vocab: .* is not the vocabulary of the run's tokenizer"):
        run_finetuning(vqa_options(data, out, vocab=other_vocab, resume=True))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    # the vocabulary the run was started with (or none) resumes
    assert run_finetuning(vqa_options(data, out, vocab=None, resume=True, stop_after=2)).step == 2
    assert run_finetuning(vqa_options(data, out, resume=True)).step == 4
