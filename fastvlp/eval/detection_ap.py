"""COCO box AP through pycocotools' COCOeval (its own printing silenced)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Dict, List, Mapping, Sequence, Union

# COCOeval.stats order for the "bbox" type.
_STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def _load_ground_truth(coco_gt):
    from pycocotools.coco import COCO

    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, bytes)) or hasattr(coco_gt, "__fspath__"):
        with open(coco_gt, encoding="utf-8") as file:
            dataset = json.load(file)
    elif isinstance(coco_gt, Mapping):
        dataset = copy.deepcopy(dict(coco_gt))
    else:
        raise TypeError(
            f"coco_gt: expected a COCO object, a path to a COCO instances JSON or its dict, got {type(coco_gt).__name__}"
        )
    # COCOeval reads both keys of every annotation; a hand-made ground truth often leaves them out.
    for annotation in dataset.get("annotations", []):
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            bbox = annotation.get("bbox")
            if isinstance(bbox, (str, bytes)) or not isinstance(bbox, Sequence) or len(bbox) != 4:
                raise ValueError(f"coco_gt: annotation {annotation.get('id')!r}: expected a bbox [x, y, w, h], got {bbox!r}")
            annotation["area"] = bbox[2] * bbox[3]
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _empty_result(gt):
    """A result set without detections, which ``loadRes`` cannot build (it reads the first detection)."""
    from pycocotools.coco import COCO

    result = COCO()
    images, categories = gt.dataset.get("images", []), gt.dataset.get("categories", [])
    result.dataset = {"images": list(images), "categories": list(categories), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        result.createIndex()
    return result


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
    ``num_detections``. No detections give 0, or -1 where the ground truth has no objects of the class.
    Annotations of a path or dict without ``iscrowd`` or ``area`` get ``iscrowd`` 0 and the box's area.
    Raises ValueError for predictions with an image id or a category id that ``coco_gt`` lacks.
    """
    from pycocotools.cocoeval import COCOeval

    _check_detections(predictions)
    gt = _load_ground_truth(coco_gt)
    unknown = {d["image_id"] for d in predictions} - set(gt.getImgIds())
    if unknown:
        raise ValueError(f"predictions: {len(unknown)} image ids are not in coco_gt, e.g. {next(iter(unknown))!r}")
    # COCOeval would score these as misses without a word; contiguous label indices written without
    # detection_results' category_ids= are the usual cause.
    unknown = sorted({d["category_id"] for d in predictions} - set(gt.getCatIds()), key=lambda c: (type(c).__name__, c))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ValueError(f"predictions: {len(unknown)} category ids are not categories of coco_gt: {shown} "
                         f"(expected ids among {sorted(gt.getCatIds())})")
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes([dict(d) for d in predictions]) if predictions else _empty_result(gt)
        evaluator = COCOeval(gt, detections, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    result: Dict[str, Union[float, int]] = {name: float(value) for name, value in zip(_STAT_NAMES, evaluator.stats)}
    result["num_detections"] = len(predictions)
    return result
