"""COCO box AP through pycocotools' COCOeval (its own printing silenced)."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Dict, List, Mapping, Sequence, Union

# COCOeval.stats order for the "bbox" type.
_STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def _load_ground_truth(coco_gt):
    from pycocotools.coco import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(coco_gt, (str, bytes)) or hasattr(coco_gt, "__fspath__"):
            return COCO(str(coco_gt))
        if isinstance(coco_gt, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(coco_gt))
            coco.createIndex()
            return coco
    raise TypeError(f"coco_gt: expected a COCO object, a path to a COCO instances JSON or its dict, got {type(coco_gt).__name__}")


def _check_detections(predictions) -> None:
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise TypeError("predictions: expected a list of COCO detection dicts")
    for index, detection in enumerate(predictions):
        if not isinstance(detection, Mapping) or not {"image_id", "category_id", "bbox", "score"} <= detection.keys():
            raise ValueError(f"predictions[{index}]: expected a dict with image_id, category_id, bbox [x, y, w, h] and score")
        if len(detection["bbox"]) != 4:
            raise ValueError(f"predictions[{index}]: bbox must be [x, y, w, h]")


def coco_detection_ap(predictions: List[Mapping], coco_gt) -> Dict[str, Union[float, int]]:
    """COCO box AP of ``predictions`` (``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in
    pixels) against ``coco_gt`` (a ``pycocotools.coco.COCO``, a path to an instances JSON, or its dict).

    Evaluates the images that have ground truth. Returns ``ap`` (IoU 0.50:0.95), ``ap50``, ``ap75``,
    ``ap_small``, ``ap_medium``, ``ap_large`` and the recalls ``ar1``, ``ar10``, ``ar100``, ``ar_small``,
    ``ar_medium``, ``ar_large``, as fractions (COCOeval's -1 where a size class is empty), and
    ``num_detections``. No detections give 0 AP.
    """
    from pycocotools.cocoeval import COCOeval

    _check_detections(predictions)
    gt = _load_ground_truth(coco_gt)
    unknown = {d["image_id"] for d in predictions} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions: {len(unknown)} image ids are not in coco_gt, e.g. {next(iter(unknown))!r}")
    if not predictions:
        return {**{name: 0.0 for name in _STAT_NAMES}, "num_detections": 0}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes([dict(d) for d in predictions])
        evaluator = COCOeval(gt, detections, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    result: Dict[str, Union[float, int]] = {name: float(value) for name, value in zip(_STAT_NAMES, evaluator.stats)}
    result["num_detections"] = len(predictions)
    return result
