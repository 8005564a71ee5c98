"""Bad options of the training, evaluation, prediction and demo commands are usage errors (exit status 2, a
message naming the option, no traceback), found before any work is done."""
import pytest
import torch

from fastvlp.cli import main
from fastvlp.inference import Predictor
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
