"""COCO detection AP through pycocotools on a tiny hand-made ground truth."""
import json

import pytest
import torch

from fastvlp.eval.detection_ap import coco_detection_ap
from fastvlp.eval.result_files import detection_results


def tiny_ground_truth():
    generator = torch.Generator().manual_seed(0)
    images = [{"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"} for image_id in (1, 2, 3)]
    categories = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    annotations = []
    for image_id in (1, 2, 3):
        for _ in range(3):
            x, y = (torch.rand(2, generator=generator) * torch.tensor([400.0, 300.0])).tolist()
            w, h = (torch.rand(2, generator=generator) * 120 + 20).tolist()  # small and medium objects
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": [3, 18][len(annotations) % 2],
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    return {"images": images, "annotations": annotations, "categories": categories}


def perfect_detections(gt, shift=0.0):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.5 + 0.01 * a["id"],
         "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
        for a in gt["annotations"]
    ]


def test_perfect_detections_score_one(tmp_path):
    gt = tiny_ground_truth()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    result = coco_detection_ap(perfect_detections(gt), path)
    assert result["ap"] == pytest.approx(1.0)
    assert result["ap50"] == pytest.approx(1.0) and result["ap75"] == pytest.approx(1.0)
    # Each size class is perfect, or -1 (COCOeval's "no object of that size").
    sizes = [result[key] for key in ("ap_small", "ap_medium", "ap_large")]
    assert all(value == pytest.approx(1.0) or value == -1.0 for value in sizes) and 1.0 in [round(v, 9) for v in sizes]
    assert result["num_detections"] == 9


def test_shifted_boxes_score_lower_and_wrong_classes_zero():
    gt = tiny_ground_truth()
    # A shift of 0.2 widths: IoU = 0.8 / 1.2 = 0.667, above 0.5 and 0.65, below 0.7 (COCO thresholds).
    shifted = coco_detection_ap(perfect_detections(gt, shift=0.2), gt)
    assert shifted["ap50"] == pytest.approx(1.0)
    assert shifted["ap75"] == pytest.approx(0.0)
    assert shifted["ap"] == pytest.approx(4 / 10)  # AP 1 at IoU thresholds 0.50..0.65, 0 at the other 6
    wrong = [dict(d, category_id=3 if d["category_id"] == 18 else 18) for d in perfect_detections(gt)]
    assert coco_detection_ap(wrong, gt)["ap"] == pytest.approx(0.0)
    assert coco_detection_ap([], gt)["ap"] == 0.0


def test_detection_records_from_normalised_boxes():
    gt = tiny_ground_truth()
    height, width = 480, 640
    boxes, labels, image_ids = [], [], []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.append([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
        labels.append([3, 18].index(a["category_id"]))
        image_ids.append(a["image_id"])
    boxes = torch.tensor(boxes, dtype=torch.float64)
    records = []
    for image_id in (1, 2, 3):
        rows = torch.tensor([i for i, owner in enumerate(image_ids) if owner == image_id])
        records += detection_results(
            image_id, boxes[rows], torch.rand(len(rows)) * 0.5 + 0.5, torch.tensor(labels)[rows], (height, width),
            category_ids=[3, 18],
        )
    for record, annotation in zip(records, gt["annotations"]):
        assert record["category_id"] == annotation["category_id"]
        assert record["bbox"] == pytest.approx(annotation["bbox"], abs=1e-9)
    assert coco_detection_ap(records, gt)["ap"] == pytest.approx(1.0)


def test_invalid_inputs():
    gt = tiny_ground_truth()
    with pytest.raises(ValueError, match="image ids"):
        coco_detection_ap([{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], gt)
    with pytest.raises(ValueError, match="predictions"):
        coco_detection_ap([{"image_id": 1, "bbox": [0, 0, 1, 1]}], gt)
    with pytest.raises(TypeError, match="coco_gt"):
        coco_detection_ap([], 42)
