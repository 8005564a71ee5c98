"""Bad options of the training, evaluation, prediction and demo commands are usage errors (exit status 2, a
message naming the option, no traceback), found before any work is done; and the fine-tuning task options
given reach their task."""
from types import SimpleNamespace

import pytest
import torch

from fastvlp.cli import main
from fastvlp.data.datasets.vqa import NUM_ANSWERS
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.inference import Predictor
from fastvlp.models.presets import get_preset
from fastvlp.train.finetune import FinetuneOptions
from fastvlp.train.loop import checked_device
from fastvlp.train.tasks import get_task

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def commands(tmp_path, device):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(exist_ok=True)
    return {
        "pretrain": ["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--device", device],
        "finetune": ["finetune", "--task", "vqa", "--preset", "tiny", "--data", str(data), "--out", str(out),
                     "--device", device],
        "evaluate": ["evaluate", "--task", "vqa", "--checkpoint", str(out), "--data", str(data), "--device", device],
        "predict": ["predict", "--task", "vqa", "--checkpoint", str(out), "--image", str(data / "a.jpg"),
                    "--text", "what?", "--device", device],
        "demo": ["demo", "--out", str(out), "--num-images", "2", "--steps", "1", "--device", device],
    }


def usage_error(argv, capsys):
    """The exit status and stderr of a command that must stop with a usage error."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    return status, err


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "predict", "demo"])
def test_a_malformed_device_is_a_usage_error(command, tmp_path, capsys):
    status, err = usage_error(commands(tmp_path, "cpux")[command], capsys)
    assert status == 2 and "argument --device: expected cpu, cuda or cuda:N, got 'cpux'" in err
    assert not (tmp_path / "out").exists()


@NO_GPU
@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "predict", "demo"])
def test_cuda_without_a_gpu_is_a_usage_error(command, tmp_path, capsys):
    status, err = usage_error(commands(tmp_path, "cuda")[command], capsys)
    assert status == 2 and "argument --device: 'cuda' asked for, but CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_checked_device():
    assert checked_device("cpu") == torch.device("cpu") and checked_device(torch.device("cpu")).type == "cpu"
    assert checked_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("cpux", "", "meta", f"cuda:{torch.cuda.device_count()}"):
        with pytest.raises(ValueError, match="^device: "):
            checked_device(bad)
    with pytest.raises(ValueError, match="^--device: "):
        checked_device("gpu", "--device")
    with pytest.raises(TypeError, match="device"):
        checked_device(0)


def test_the_predictor_names_a_bad_device(tmp_path):
    with pytest.raises(ValueError, match="device: expected cpu, cuda or cuda:N, got 'cpux'"):
        Predictor.from_checkpoint(tmp_path, device="cpux")


def test_an_unknown_demo_preset_is_refused_before_data_is_written(tmp_path, capsys):
    status, err = usage_error(["demo", "--out", str(tmp_path / "out"), "--num-images", "2", "--steps", "1",
                               "--preset", "foo"], capsys)
    assert status == 2 and "argument --preset: invalid choice: 'foo'" in err
    assert not (tmp_path / "out").exists()


def test_a_zero_answer_vocabulary_is_refused(tmp_path, capsys):
    argv = commands(tmp_path, "cpu")["finetune"] + ["--num-answers", "0"]
    status, err = usage_error(argv, capsys)
    assert status == 2 and "argument --num-answers: expected a positive int" in err
    options = FinetuneOptions(task="vqa", preset="tiny", data=tmp_path / "data", out=tmp_path / "out",
                              device="cpu", task_options={"num_answers": 0})
    with pytest.raises(ValueError, match="num_answers: expected a positive int, got 0"):
        options.validate()
    with pytest.raises(ValueError, match="num_answers"):
        get_task("vqa").read_training_data(tmp_path / "data", {"num_answers": 0})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "argument --max-steps: expected a positive int, got 0"),
    (["--set", "no_such_field=1"], "argument --set: unknown model configuration fields ['no_such_field']"),
    (["--set", "d_model=wide"], "argument --set: d_model: expected an int"),
    (["--warmup-steps", "9", "--max-steps", "4"], "argument --warmup-steps: expected 0..max_steps=4, got 9"),
])
def test_bad_pretraining_options_are_usage_errors(extra, message, tmp_path, capsys):
    status, err = usage_error(commands(tmp_path, "cpu")["pretrain"] + extra, capsys)
    assert status == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_bad_counts_of_evaluate_and_predict_are_usage_errors(tmp_path, capsys):
    status, err = usage_error(commands(tmp_path, "cpu")["evaluate"] + ["--batch-size", "0"], capsys)
    assert status == 2 and "argument --batch-size: expected a positive int, got '0'" in err
    status, err = usage_error(commands(tmp_path, "cpu")["predict"] + ["--top-k", "-1"], capsys)
    assert status == 2 and "argument --top-k: expected a positive int, got '-1'" in err


@pytest.mark.parametrize("task, extra, message", [
    ("retrieval", ["--num-answers", "8"],
     "argument --num-answers: expected only with task 'vqa', got it with task 'retrieval'"),
    ("vqa", ["--no-text"], "argument --no-text: expected only with task 'detection', got it with task 'vqa'"),
    ("detection", ["--num-negatives", "2"],
     "argument --num-negatives: expected only with task 'retrieval', got it with task 'detection'"),
    ("retrieval", ["--batch-size", "1"], "argument --batch-size: expected at least 2 for retrieval"),
])
def test_options_the_task_does_not_take_are_usage_errors(task, extra, message, tmp_path, capsys):
    argv = commands(tmp_path, "cpu")["finetune"] + ["--task", task] + extra
    status, err = usage_error(argv, capsys)
    assert status == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_vocab_with_init_is_a_usage_error(tmp_path, capsys):
    init, vocab = tmp_path / "init", tmp_path / "vocab.txt"
    init.mkdir()
    (init / "config.json").write_text(get_preset("tiny").to_json())
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    argv = ["finetune", "--task", "vqa", "--init", str(init), "--vocab", str(vocab), "--data", str(tmp_path),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    status, err = usage_error(argv, capsys)
    assert status == 2 and "argument --vocab: expected only with preset" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task, extra, task_options", [
    ("vqa", [], {}),  # the task's defaults: 3129 answers
    ("vqa", ["--num-answers", "8"], {"num_answers": 8}),
    ("detection", [], {}),  # with the caption
    ("detection", ["--no-text"], {"with_text": False}),
    ("retrieval", [], {}),  # 3 negatives
    ("retrieval", ["--num-negatives", "2"], {"num_negatives": 2}),
    ("caption", [], {}),
])
def test_the_task_options_given_reach_their_task(task, extra, task_options, tmp_path, capsys, monkeypatch):
    called = []

    def run(options):
        called.append(options)
        return SimpleNamespace(step=0, checkpoint=None, metrics_path=None)

    monkeypatch.setattr("fastvlp.train.finetune.run_finetuning", run)
    assert main(commands(tmp_path, "cpu")["finetune"] + ["--task", task] + extra) == 0
    assert len(called) == 1 and called[0].task == task and called[0].task_options == task_options


def test_left_out_task_options_take_the_documented_defaults(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 4, seed=0, datasets=("coco", "flickr30k"))
    assert get_task("retrieval").read_training_data(tmp_path / "data", {}).task_state["num_negatives"] == 3
    assert get_task("detection").read_training_data(tmp_path / "data", {}).task_state["with_text"] is True
    assert NUM_ANSWERS == 3129
