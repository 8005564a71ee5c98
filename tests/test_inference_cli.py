"""The ``fastvlp finetune`` / ``evaluate`` / ``predict`` commands and :class:`fastvlp.inference.Predictor`
on a 2-step VQA run of a very small model (CPU)."""
import json

import pytest
from PIL import Image
from train_helpers import SMALL_MODEL

from fastvlp.cli import main
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.eval.vqa_accuracy import vqa_accuracy
from fastvlp.inference import Predictor


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    write_synthetic_dataset(root, 24, seed=3, datasets=("coco", "vqa"))
    return root


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    overrides = [item for name, value in SMALL_MODEL.items() for item in ("--set", f"{name}={value}")]
    code = main(["finetune", "--task", "vqa", "--preset", "tiny", "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "4", "--device", "cpu", "--no-progress", "--num-answers", "6",
                 *overrides])
    assert code == 0
    return out / "checkpoints" / "step-2"


@pytest.fixture(scope="module")
def val_questions(data):
    questions = json.loads((data / "vqa" / "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"]
    annotations = json.loads((data / "vqa" / "v2_mscoco_val_annotations.json").read_text())["annotations"]
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    return questions, answers


def _image_path(data, image_id):
    return next((data / "coco" / "images").rglob(f"*{image_id:012d}.jpg"))


def test_finetune_command_writes_a_checkpoint(checkpoint):
    saved = json.loads((checkpoint / "task.json").read_text())
    assert saved["task"] == "vqa" and saved["preset"] == "tiny" and len(saved["answers"]) == 6  # --num-answers
    config = json.loads((checkpoint / "config.json").read_text())
    assert {k: config[k] for k in SMALL_MODEL} == SMALL_MODEL  # the --set overrides
    lines = (checkpoint.parent.parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_evaluate_command_writes_metrics_and_predictions(checkpoint, data, val_questions, tmp_path, capsys):
    questions, answers = val_questions
    out, predictions_path = tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "predictions.json"
    code = main(["evaluate", "--task", "vqa", "--checkpoint", str(checkpoint), "--data", str(data), "--device", "cpu",
                 "--batch-size", "8", "--out", str(out), "--predictions", str(predictions_path)])
    assert code == 0
    written = json.loads(out.read_text())
    assert {"task", "split", "num_examples", "metrics"} <= set(written)
    assert written["task"] == "vqa" and written["split"] == "val" and written["num_examples"] == len(questions)
    predictions = json.loads(predictions_path.read_text())
    assert [p["question_id"] for p in predictions] == [q["question_id"] for q in questions]
    assert all(set(p) == {"question_id", "answer"} and isinstance(p["answer"], str) for p in predictions)
    expected = sum(vqa_accuracy(p["answer"], answers[p["question_id"]]) for p in predictions) / len(predictions)
    assert 0 <= written["metrics"]["accuracy"] <= 1
    assert written["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    printed = capsys.readouterr().out
    assert "vqa on val" in printed and "accuracy" in printed and str(out) in printed
    # the Python API gives the same numbers
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.evaluate(data, batch_size=8).metrics == written["metrics"]


def test_predict_command_prints_json(checkpoint, data, val_questions, capsys):
    question = val_questions[0][0]
    image = _image_path(data, question["image_id"])
    code = main(["predict", "--task", "vqa", "--checkpoint", str(checkpoint), "--image", str(image),
                 "--text", question["question"], "--top-k", "3", "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "vqa" and printed["question"] == question["question"] and len(printed["answers"]) == 3
    scores = [a["score"] for a in printed["answers"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    answers = json.loads((checkpoint / "task.json").read_text())["answers"]
    assert all(a["answer"] in answers for a in printed["answers"])
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.predict(image, text=question["question"], top_k=3) == printed


def test_a_task_mismatch_is_refused(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--task", "caption", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)])
    assert code == 1 and "fine-tuned for vqa" in capsys.readouterr().err and not out.exists()
    image = next((data / "coco" / "images").rglob("*.jpg"))
    code = main(["predict", "--task", "nlvr2", "--checkpoint", str(checkpoint), "--image", str(image),
                 "--image2", str(image), "--text", "x"])
    captured = capsys.readouterr()
    assert code == 1 and "fine-tuned for vqa" in captured.err and captured.out == ""
    # a VQA prediction without a question, and a folder that is no fine-tuned checkpoint
    code = main(["predict", "--task", "vqa", "--checkpoint", str(checkpoint), "--image", str(image), "--device", "cpu"])
    assert code == 1 and "question" in capsys.readouterr().err
    code = main(["predict", "--task", "vqa", "--checkpoint", str(tmp_path), "--image", str(image), "--text", "x"])
    assert code == 1 and "task.json" in capsys.readouterr().err


def test_predictor_on_a_pil_image(checkpoint, data, val_questions):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.scale == "tiny" and predictor.task.name == "vqa" and not predictor.model.training
    question = val_questions[0][1]
    path = _image_path(data, question["image_id"])
    with Image.open(path) as opened:
        image = opened.copy()
    answer = predictor.predict(image, text=question["question"], top_k=2)
    assert len(answer["answers"]) == 2 and answer == predictor.predict(path, text=question["question"], top_k=2)
    # a rotated image gets other scores: the image reaches the model
    other = predictor.predict(image.rotate(90, expand=True), text=question["question"], top_k=2)
    assert other["answers"] != answer["answers"]
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="top_k"):
            predictor.predict(image, text=question["question"], top_k=bad)
    with pytest.raises(TypeError, match="text"):
        predictor.predict(image, text=5)
    with pytest.raises(TypeError, match="image"):
        predictor.predict(123, text=question["question"])
    with pytest.raises(ValueError, match=r"image2: expected none for the vqa task \(only nlvr2"):
        predictor.predict(image, image2=image, text=question["question"])
    with pytest.raises(ValueError, match=r"num_beams: expected none for the vqa task \(only caption"):
        predictor.predict(image, text=question["question"], num_beams=1)
    with pytest.raises(ValueError, match=r"max_length: expected none for the vqa task \(only caption"):
        predictor.evaluate(data, max_length=5)
    with pytest.raises(ValueError, match="batch_size"):
        predictor.evaluate(data, batch_size=0)
    with pytest.raises(FileNotFoundError, match="data"):
        predictor.evaluate(data / "missing")


def test_predictor_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Predictor.from_checkpoint(tmp_path)
