"""The task-specific inputs of ``fastvlp evaluate`` / ``predict`` and :class:`fastvlp.inference.Predictor`:
captioning's ``--num-beams`` / ``--max-length``, NLVR2's second image, and the usage errors for inputs a task
does not take (2-step caption and NLVR2 runs of a very small model, CPU)."""
import json
import re
import shutil

import pytest
import torch
from train_helpers import SMALL_MODEL, SMALL_SCALE

from fastvlp.cli import main
from fastvlp.data.images import load_rgb_image
from fastvlp.data.readers.nlvr2 import read_nlvr2
from fastvlp.data.synth.generate import write_synthetic_dataset
from fastvlp.data.transforms import eval_transform
from fastvlp.eval import caption_metrics
from fastvlp.inference import Predictor
from fastvlp.models.generation import generate_captions
from fastvlp.train.finetune import FinetuneOptions, run_finetuning
from fastvlp.train.tasks.caption import read_caption_records


@pytest.fixture(scope="module", autouse=True)
def runs_on_one_thread(drivers_on_one_thread):
    yield


@pytest.fixture(autouse=True)
def no_java(monkeypatch):
    """The Java-free caption metrics: scoring with Java takes tens of seconds on a small machine."""
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("options_data")
    write_synthetic_dataset(root, 24, seed=4, datasets=("coco", "nlvr2"))
    return root


def _finetune(task, data, out):
    options = FinetuneOptions(task=task, preset="tiny", data=data, out=out, max_steps=2, batch_size=4, progress=False,
                              device="cpu", scale=SMALL_SCALE, config_overrides=dict(SMALL_MODEL))
    return run_finetuning(options).checkpoint


@pytest.fixture(scope="module")
def caption_checkpoint(data, tmp_path_factory):
    return _finetune("caption", data, tmp_path_factory.mktemp("caption_run") / "run")


@pytest.fixture(scope="module")
def nlvr2_checkpoint(data, tmp_path_factory):
    return _finetune("nlvr2", data, tmp_path_factory.mktemp("nlvr2_run") / "run")


def _pixels(path):
    image = eval_transform(SMALL_SCALE)(load_rgb_image(path))  # the scale the runs were fine-tuned at
    return image.image, tuple(image.original_size)


def _caption(predictor, path, num_beams, max_length=20):
    """The model's own generation for the image at ``path``."""
    pixels, _ = _pixels(path)
    ids = generate_captions(predictor.model.vlp, pixels[None], torch.zeros(1, *pixels.shape[1:], dtype=torch.bool),
                            bos_id=predictor.tokenizer.cls_id, eos_id=predictor.tokenizer.sep_id,
                            pad_id=predictor.tokenizer.pad_id, max_length=max_length, num_beams=num_beams,
                            length_penalty=0.9)[0]
    return predictor.tokenizer.decode(ids)


def test_evaluate_decodes_greedily_with_one_beam(caption_checkpoint, data, tmp_path, capsys):
    predictor = Predictor.from_checkpoint(caption_checkpoint, device="cpu")
    records = read_caption_records(data, "test").records  # one image a batch below: no padding
    greedy = {r.image_id: _caption(predictor, r.image_path, 1) for r in records}
    beam = {r.image_id: _caption(predictor, r.image_path, 4) for r in records}
    path = tmp_path / "greedy.json"
    code = main(["evaluate", "--task", "caption", "--checkpoint", str(caption_checkpoint), "--data", str(data),
                 "--device", "cpu", "--num-beams", "1", "--batch-size", "1", "--predictions", str(path)])
    assert code == 0 and "caption on test" in capsys.readouterr().out
    assert {p["image_id"]: p["caption"] for p in json.loads(path.read_text())} == greedy and greedy
    assert greedy != beam  # so the option did change the decoding
    # the default is beam 4; the Python API takes the same options
    default = predictor.evaluate(data, batch_size=1)
    assert {p["image_id"]: p["caption"] for p in default.predictions} == beam
    short = predictor.evaluate(data, batch_size=1, num_beams=1, max_length=3)
    expected = {r.image_id: _caption(predictor, r.image_path, 1, max_length=3) for r in records}
    assert {p["image_id"]: p["caption"] for p in short.predictions} == expected


def test_predict_decodes_greedily_with_one_beam(caption_checkpoint, data, capsys):
    predictor = Predictor.from_checkpoint(caption_checkpoint, device="cpu")
    image = read_caption_records(data, "val").records[0].image_path
    code = main(["predict", "--task", "caption", "--checkpoint", str(caption_checkpoint), "--image", str(image),
                 "--device", "cpu", "--num-beams", "1", "--max-length", "5"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"task": "caption", "caption": _caption(predictor, image, 1, max_length=5)}
    assert predictor.predict(image, num_beams=1, max_length=5) == printed
    assert predictor.predict(image) == {"task": "caption", "caption": _caption(predictor, image, 4)}


def test_nlvr2_prediction_from_two_images(nlvr2_checkpoint, data, capsys):
    predictor = Predictor.from_checkpoint(nlvr2_checkpoint, device="cpu")
    record = read_nlvr2(data / "nlvr2", "dev").records[0]
    left, right = record.left_image_path, record.right_image_path
    code = main(["predict", "--task", "nlvr2", "--checkpoint", str(nlvr2_checkpoint), "--image", str(left),
                 "--image2", str(right), "--text", record.sentence, "--device", "cpu"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    (left_pixels, left_size), (right_pixels, right_size) = _pixels(left), _pixels(right)
    with torch.inference_mode():
        expected = predictor.task.predict(predictor.model, predictor.tokenizer, [left_pixels, right_pixels],
                                          [left_size, right_size], record.sentence, 5)
        swapped = predictor.task.predict(predictor.model, predictor.tokenizer, [right_pixels, left_pixels],
                                         [right_size, left_size], record.sentence, 5)
    assert printed == expected and set(printed) == {"task", "statement", "label", "probability"}
    assert swapped["probability"] != expected["probability"]  # the order of the images matters
    assert 0 < printed["probability"] < 1 and printed["label"] is (printed["probability"] > 0.5)
    assert predictor.predict(left, image2=right, text=record.sentence) == expected
    # image2 is the right image: the swapped pair is the task's prediction for the swapped images
    assert predictor.predict(right, image2=left, text=record.sentence) == swapped


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_inputs_a_task_does_not_take_are_usage_errors(tmp_path, capsys):
    """Refused before any checkpoint loads (``tmp_path`` is none)."""
    image = str(tmp_path / "a.jpg")
    evaluate = ["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]
    predict = ["predict", "--checkpoint", str(tmp_path), "--image", image]
    for task in ("vqa", "nlvr2", "retrieval", "detection"):
        err = _usage_error([*evaluate, "--task", task, "--num-beams", "1"], capsys)
        assert f"argument --num-beams: expected only with --task caption (the {task} task" in err
        err = _usage_error([*evaluate, "--task", task, "--max-length", "5"], capsys)
        assert "argument --max-length: expected only with --task caption" in err
    err = _usage_error([*predict, "--task", "vqa", "--text", "q", "--num-beams", "2"], capsys)
    assert "argument --num-beams: expected only with --task caption" in err
    err = _usage_error([*predict, "--task", "detection", "--max-length", "5"], capsys)
    assert "argument --max-length: expected only with --task caption" in err
    for option in ("--num-beams", "--max-length"):
        for bad in ("0", "-2", "x"):
            err = _usage_error([*evaluate, "--task", "caption", option, bad], capsys)
            assert f"argument {option}: expected a positive int, got '{bad}'" in err
            err = _usage_error([*predict, "--task", "caption", option, bad], capsys)
            assert f"argument {option}: expected a positive int, got '{bad}'" in err
    for task in ("vqa", "caption", "retrieval", "detection"):
        err = _usage_error([*predict, "--task", task, "--image2", image], capsys)
        assert f"argument --image2: expected only with --task nlvr2 (the {task} task takes one image)" in err
    err = _usage_error([*predict, "--task", "nlvr2", "--text", "a statement"], capsys)
    assert "argument --image2: expected the right image, which --task nlvr2 needs" in err
    err = _usage_error([*predict, "--task", "caption", "--text", "a caption"], capsys)
    assert "argument --text: expected none with --task caption" in err
    for task, extra in (("nlvr2", ["--image2", image, "--text", "s"]), ("caption", []), ("retrieval", ["--text", "c"])):
        err = _usage_error([*predict, "--task", task, "--top-k", "2", *extra], capsys)
        assert f"argument --top-k: expected only with --task vqa or detection (the {task} task ranks" in err
    # with the inputs right, a missing image file is named before the checkpoint would load
    err = _usage_error([*predict, "--task", "vqa", "--text", "q", "--top-k", "2"], capsys)
    assert f"argument --image: no such file: {image}" in err
    (tmp_path / "a.jpg").write_bytes(b"")
    err = _usage_error([*predict, "--task", "nlvr2", "--text", "s", "--image2", str(tmp_path / "b.jpg")], capsys)
    assert f"argument --image2: no such file: {tmp_path / 'b.jpg'}" in err


def test_predictor_refuses_inputs_its_task_does_not_take(caption_checkpoint, nlvr2_checkpoint, data, tmp_path, capsys):
    image = read_caption_records(data, "val").records[0].image_path
    caption = Predictor.from_checkpoint(caption_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="text: expected none for the caption task"):
        caption.predict(image, text="a caption")
    with pytest.raises(ValueError, match=r"image2: expected none for the caption task \(only nlvr2"):
        caption.predict(image, image2=image)
    with pytest.raises(ValueError, match=r"top_k: expected none for the caption task \(only vqa and detection"):
        caption.predict(image, top_k=2)
    for bad in (0, True):
        with pytest.raises(ValueError, match="num_beams: expected a positive int"):
            caption.predict(image, num_beams=bad)
        with pytest.raises(ValueError, match="num_beams: expected a positive int"):
            caption.evaluate(data, num_beams=bad)
    limit = caption.model.config.max_text_len
    with pytest.raises(ValueError, match=rf"max_length: expected an int in \[1, {limit}\]"):
        caption.predict(image, max_length=limit + 1)
    with pytest.raises(ValueError, match=rf"max_length: expected an int in \[1, {limit}\]"):
        caption.evaluate(data, max_length=0)
    # past the usage checks, a max_length above the model's is the command's error, naming it
    code = main(["predict", "--task", "caption", "--checkpoint", str(caption_checkpoint), "--image", str(image),
                 "--device", "cpu", "--max-length", str(limit + 1)])
    assert code == 1 and f"max_length: expected an int in [1, {limit}]" in capsys.readouterr().err

    nlvr2 = Predictor.from_checkpoint(nlvr2_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="image2: expected the right image, which the nlvr2 task needs, got None"):
        nlvr2.predict(image, text="a statement")
    with pytest.raises(ValueError, match=r"num_beams: expected none for the nlvr2 task \(only caption"):
        nlvr2.predict(image, image2=image, text="a statement", num_beams=1)
    with pytest.raises(ValueError, match=r"max_length: expected none for the nlvr2 task \(only caption"):
        nlvr2.evaluate(data, max_length=5)
    with pytest.raises(ValueError, match=r"top_k: expected none for the nlvr2 task"):
        nlvr2.predict(image, image2=image, text="a statement", top_k=1)


def test_a_detection_checkpoint_without_text_refuses_text(data, tmp_path):
    options = FinetuneOptions(task="detection", preset="tiny", data=data, out=tmp_path / "run", max_steps=1,
                              batch_size=2, progress=False, device="cpu", scale=SMALL_SCALE,
                              config_overrides=dict(SMALL_MODEL), task_options={"with_text": False})
    predictor = Predictor.from_checkpoint(run_finetuning(options).checkpoint, device="cpu")
    image = read_caption_records(data, "val").records[0].image_path
    with pytest.raises(ValueError, match=r"^text: expected none for this detection checkpoint, which was fine-tuned "
                                         r"without text \(--no-text\)"):
        predictor.predict(image, text="a red circle")
    output = predictor.predict(image, top_k=3)
    assert output["text"] is None and len(output["detections"]) == 3


def test_weights_that_do_not_fit_the_checkpoint_are_named(caption_checkpoint, nlvr2_checkpoint, data, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(caption_checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"^checkpoint: {re.escape(str(weights))} does not hold the weights its "
                                         r"config.json and task.json describe \("):
        Predictor.from_checkpoint(damaged, device="cpu")
    shutil.copy(nlvr2_checkpoint / "model.safetensors", weights)  # another task's heads
    with pytest.raises(ValueError, match=r"does not hold the weights its config.json and task.json describe"):
        Predictor.from_checkpoint(damaged, device="cpu")
    image = read_caption_records(data, "val").records[0].image_path
    code = main(["predict", "--task", "caption", "--checkpoint", str(damaged), "--image", str(image), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"fastvlp predict: checkpoint: {weights} does not hold") and "Traceback" not in err
