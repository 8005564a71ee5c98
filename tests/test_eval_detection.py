"""COCO detection AP through pycocotools on a tiny hand-made ground truth, and the detection task's evaluation
(the ground truth it hands pycocotools) on a small synthetic set with and without malformed annotations."""
import json

import pytest
import torch

from train_helpers import SMALL_SCALE

from fastvlp.data.readers.coco import read_coco_instances
from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.eval.detection_ap import coco_detection_ap
from fastvlp.eval.result_files import detection_results
from fastvlp.models.outputs import DetectionOutput
from fastvlp.train.tasks import get_task


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


def bare_ground_truth():
    """Boxes without iscrowd or area: areas 100 and 800 (small, the second 40 px wide) and 2500 (medium)."""
    return {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "categories": [{"id": 5, "name": "cup"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [50, 50, 40, 20]},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [20, 30, 50, 50]},
        ],
    }


def test_bare_ground_truth_gets_crowd_and_area_defaults(tmp_path):
    gt = bare_ground_truth()
    perfect = perfect_detections(gt)
    result = coco_detection_ap(perfect, gt)
    assert result["ap"] == pytest.approx(1.0) and result["ar100"] == pytest.approx(1.0)
    assert result["ap_small"] == pytest.approx(1.0) and result["ap_medium"] == pytest.approx(1.0)
    assert result["ap_large"] == -1.0 and result["ar_large"] == -1.0
    assert all("iscrowd" not in a and "area" not in a for a in gt["annotations"])  # the caller's dict is untouched
    # Only the 40 x 20 box found: the small class is half found, so its area was taken as w * h = 800 < 32 ** 2.
    only_wide = coco_detection_ap([perfect[1]], gt)
    assert only_wide["ar_small"] == pytest.approx(0.5) and only_wide["ar_medium"] == 0.0
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(gt))
    assert coco_detection_ap(perfect, path) == result
    gt["annotations"][0]["bbox"] = [1, 2]
    with pytest.raises(ValueError, match="coco_gt: annotation 1: expected a bbox"):
        coco_detection_ap(perfect, gt)


def test_no_predictions_give_what_cocoeval_gives():
    gt = bare_ground_truth()
    empty = coco_detection_ap([], gt)
    # 0 where the ground truth has objects, COCOeval's -1 for the size class without any (large).
    assert empty == {**{name: 0.0 for name in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ar1", "ar10", "ar100",
                                               "ar_small", "ar_medium")},
                     "ap_large": -1.0, "ar_large": -1.0, "num_detections": 0}
    # A detection that matches nothing scores the same.
    miss = coco_detection_ap([{"image_id": 2, "category_id": 5, "bbox": [150, 150, 5, 5], "score": 0.9}], gt)
    assert {k: v for k, v in miss.items() if k != "num_detections"} == {k: v for k, v in empty.items() if k != "num_detections"}


def test_unknown_category_ids_are_refused():
    gt = tiny_ground_truth()
    detections = perfect_detections(gt)
    detections[4] = dict(detections[4], category_id=7)
    with pytest.raises(ValueError, match=r"predictions: 1 category ids are not categories of coco_gt: 7 \(expected ids among \[3, 18\]\)"):
        coco_detection_ap(detections, gt)
    # Contiguous label indices instead of COCO ids
    indices = [dict(d, category_id=[3, 18].index(d["category_id"])) for d in perfect_detections(gt)]
    with pytest.raises(ValueError, match="predictions: 2 category ids are not categories of coco_gt: 0, 1 "):
        coco_detection_ap(indices, gt)


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


# ---------------------------------------------------------------------------- the detection task's evaluation


class RecordDetector:
    """Stands in for a DetectionModel in DetectionTask.evaluate: for each image, in the reader's order, one
    query per object of the record (its box, jittered by ``noise`` of its size, and its class with a random
    confidence) and two no-object queries."""

    with_text = False

    def __init__(self, records, category_ids, noise=0.0, seed=0):
        self.queue = list(records)
        self.category_ids = list(category_ids)
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)
        self.num_queries = max(len(r.objects) for r in records) + 2

    def eval(self):
        return self

    def detection_outputs(self, images, pixel_mask, input_ids=None, text_attention_mask=None, *, aux_outputs=None):
        batch = [self.queue.pop(0) for _ in range(images.shape[0])]
        logits = torch.zeros(len(batch), self.num_queries, len(self.category_ids) + 1)
        logits[..., -1] = 12.0
        boxes = torch.rand(len(batch), self.num_queries, 4, generator=self.generator) * 0.4 + 0.1
        for row, record in enumerate(batch):
            for query, obj in enumerate(record.objects):
                x0, y0, x1, y1 = obj.box
                w, h = x1 - x0, y1 - y0
                jitter = (torch.rand(4, generator=self.generator) - 0.5) * self.noise
                box = torch.tensor([(x0 + x1) / 2 / record.width, (y0 + y1) / 2 / record.height,
                                    w / record.width, h / record.height]) * (1 + jitter)
                boxes[row, query] = box
                logits[row, query, -1] = 0.0
                confidence = 4.0 + 8.0 * torch.rand((), generator=self.generator)
                logits[row, query, self.category_ids.index(obj.category_id)] = confidence
        return DetectionOutput(logits, boxes)


@pytest.fixture
def coco_data(tmp_path):
    root = tmp_path / "data"
    write_synthetic_dataset(root, 12, seed=0, datasets=("coco",))
    return root


def evaluate_detection(data, noise=0.0):
    read = read_coco_instances(data / "coco", "val")
    model = RecordDetector(read.records, [c.id for c in read.categories], noise=noise)
    result = get_task("detection").evaluate(model, None, data, "val", torch.device("cpu"), 2, SMALL_SCALE)
    assert not model.queue
    return result, read


def test_task_evaluation_on_clean_data_scores_the_instances_file(coco_data):
    result, _ = evaluate_detection(coco_data, noise=0.3)
    direct = coco_detection_ap(result.predictions, coco_data / "coco" / "annotations" / "instances_val.json")
    assert 0.05 < result.metrics["ap"] < 0.95  # imperfect detections: the comparison is not of two ones
    # pycocotools' own numbers, with its -1 (a size class without objects) reported as undefined
    assert result.metrics == {key: None if direct[key] == -1 else direct[key] for key in result.metrics}
    assert not result.skipped and not any("skipped" in note for note in result.notes)


def test_task_evaluation_leaves_out_the_annotations_the_reader_skipped(coco_data):
    path = coco_data / "coco" / "annotations" / "instances_val.json"
    content = json.loads(path.read_text())
    annotations = content["annotations"]
    annotations[0]["bbox"] = "oops"  # malformed: pycocotools cannot read it
    annotations[1]["bbox"][2] = 0.0  # no area: no detection could ever match it
    del annotations[2]["area"], annotations[2]["iscrowd"]  # accepted by the reader, needed by COCOeval
    annotations[3]["id"] = annotations[4]["id"]  # duplicate ids: COCOeval would see one of the two
    path.write_text(json.dumps(content))
    result, read = evaluate_detection(coco_data)
    assert result.skipped == {"malformed_annotation": 1, "invalid_box": 1}
    assert any("2 annotation entries the reader skipped" in note for note in result.notes)
    assert sum(len(r.objects) for r in read.records) == len(annotations) - 2
    # Every remaining annotation is found: AP 1 (a skipped one left in would be a miss, or a crash).
    assert result.metrics["ap"] == pytest.approx(1.0) and result.metrics["ap50"] == pytest.approx(1.0)
