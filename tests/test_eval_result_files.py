"""Official result-file formats and classification accuracy."""
import json
import os
import stat

import pytest
import torch

from fastvlp.eval.classification import classification_accuracy
from fastvlp.eval.result_files import (
    cxcywh_to_coco_xywh,
    detection_results,
    write_caption_results,
    write_detection_results,
    write_vqa_results,
)


def test_writers_round_trip(tmp_path):
    write_vqa_results(tmp_path / "vqa.json", {torch.tensor(7): "yes", 9: "2"})
    assert json.loads((tmp_path / "vqa.json").read_text()) == [
        {"question_id": 7, "answer": "yes"}, {"question_id": 9, "answer": "2"},
    ]
    write_caption_results(tmp_path / "sub" / "captions.json", {42: "a dog"})
    assert json.loads((tmp_path / "sub" / "captions.json").read_text()) == [{"image_id": 42, "caption": "a dog"}]
    records = detection_results(
        5, torch.tensor([[0.5, 0.5, 0.2, 0.4]]), torch.tensor([0.75]), torch.tensor([1]), (100, 200), category_ids=[3, 18]
    )
    write_detection_results(tmp_path / "det.json", records)
    (written,) = json.loads((tmp_path / "det.json").read_text())
    assert written["image_id"] == 5 and written["category_id"] == 18
    assert written["bbox"] == pytest.approx([80.0, 30.0, 40.0, 40.0]) and written["score"] == pytest.approx(0.75)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.json", "sub", "vqa.json"]  # no temporary files left


def test_box_conversion_against_loop():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(6, 4, generator=generator, dtype=torch.float64)
    height, width = 375, 500
    converted = cxcywh_to_coco_xywh(boxes, (height, width))
    for box, out in zip(boxes.tolist(), converted.tolist()):
        cx, cy, w, h = box
        assert out == pytest.approx([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], abs=1e-12)
    assert cxcywh_to_coco_xywh(torch.zeros(0, 4), (10, 10)).shape == (0, 4)


def test_classification_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [-1.0, 1.0]])
    assert classification_accuracy(logits, torch.tensor([1, 0, 1, 1])) == pytest.approx(0.75)
    assert classification_accuracy([True, False, True], [True, True, True]) == pytest.approx(2 / 3)


def test_invalid_inputs(tmp_path):
    with pytest.raises(TypeError, match="answers"):
        write_vqa_results(tmp_path / "x.json", {1: 2})
    with pytest.raises(ValueError, match="boxes"):
        cxcywh_to_coco_xywh(torch.zeros(3, 5), (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        cxcywh_to_coco_xywh(torch.zeros(3, 4), (0, 10))
    with pytest.raises(ValueError, match="labels"):
        detection_results(1, torch.rand(1, 4), torch.rand(1), torch.tensor([4]), (10, 10), category_ids=[1, 2])
    with pytest.raises(ValueError, match="detections"):
        write_detection_results(tmp_path / "d.json", [{"image_id": 1}])
    with pytest.raises(ValueError, match="predictions"):
        classification_accuracy(torch.tensor([1, 0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="predictions"):
        classification_accuracy(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    from fastvlp.eval.result_files import write_json

    path = tmp_path / "out" / "metrics.json"
    write_json(path, {"accuracy": 0.5}, indent=1)
    write_json(path, [{"question_id": 1, "answer": "red"}])
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "red"}]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_write_json_gives_the_mode_of_a_plainly_opened_file(tmp_path, monkeypatch, umask, mode):
    from fastvlp.eval import result_files
    from fastvlp.eval.result_files import _umask, write_json

    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    previous = os.umask(umask)
    try:
        assert _umask() == umask
        with monkeypatch.context() as patch:
            patch.setattr(result_files, "open", no_proc, raising=False)  # where /proc/self/status is missing
            assert _umask() == umask
        assert os.umask(umask) == umask  # the fallback put it back
        write_json(tmp_path / "res.json", [])
        with open(tmp_path / "plain.json", "w"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "res.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == mode


def test_the_metrics_table_says_undefined_for_a_metric_without_a_value():
    from types import SimpleNamespace

    from fastvlp.eval.evaluate_cli import format_table

    result = SimpleNamespace(task="detection", split="val", num_examples=3,
                             metrics={"ap": 0.25, "ap_large": None, "count": 7})
    lines = format_table(result).splitlines()
    assert lines[0] == "detection on val: 3 examples"
    assert [line.split() for line in lines[2:]] == [["ap", "0.2500"], ["ap_large", "undefined"], ["count", "7"]]
