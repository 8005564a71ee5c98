"""Bottom-up-attention box selection: per-class NMS over every RoI, then each RoI's best surviving score."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

BOX_SELECTIONS = ("thresholded", "fixed")


def per_class_max_confidence(boxes: Tensor, class_scores: Tensor, iou_threshold: float = 0.3) -> Tensor:
    """``[R]``: for each RoI, its highest class score among the classes for which it survives NMS.

    ``boxes`` ``[R, 4]`` (x1, y1, x2, y2), the same box for every class as bottom-up's feature extraction
    uses the RoIs; ``class_scores`` ``[R, C]`` without the background column. No score threshold comes
    before NMS, so all ``R x C`` boxes go through it (one NMS per class), as in bottom-up attention.
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected a tensor [R, 4], got {getattr(boxes, 'shape', type(boxes))}")
    if not isinstance(class_scores, Tensor) or class_scores.dim() != 2 or class_scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"class_scores: expected a tensor [{boxes.shape[0]}, C], got {getattr(class_scores, 'shape', type(class_scores))}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in [0, 1], got {iou_threshold}")
    num_rois, num_classes = class_scores.shape
    best = class_scores.new_zeros(num_rois, dtype=torch.float32)
    boxes, class_scores = boxes.float(), class_scores.float()
    # One NMS per class, as the original loop. torchvision's batched_nms is no faster here: beyond 4000
    # boxes on a CPU (100k on a GPU) it masks all R x C boxes once per class, and its single-NMS
    # alternative needs an (R x C)^2 overlap mask.
    for column in range(num_classes):
        scores = class_scores[:, column]
        keep = nms(boxes, scores, iou_threshold)
        best[keep] = torch.maximum(best[keep], scores[keep])
    return best

def select_boxes(
    confidence: Tensor,
    mode: str = "thresholded",
    *,
    threshold: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
    fixed_boxes: int = 36,
) -> Tensor:
    """Indices of the kept RoIs, best first.

    ``"thresholded"``: those with ``confidence >= threshold``, at least ``min_boxes`` and at most
    ``max_boxes`` of them (topped up or cut by confidence); ``"fixed"``: the ``fixed_boxes`` most
    confident. Fewer are returned only when there are fewer RoIs.
    """
    if not isinstance(confidence, Tensor) or confidence.dim() != 1:
        raise ValueError(f"confidence: expected a tensor [R], got {getattr(confidence, 'shape', type(confidence))}")
    if mode not in BOX_SELECTIONS:
        raise ValueError(f"mode: expected one of {BOX_SELECTIONS}, got {mode!r}")
    for name, value in (("min_boxes", min_boxes), ("max_boxes", max_boxes), ("fixed_boxes", fixed_boxes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {value!r}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold != threshold:
        raise ValueError(f"threshold: expected a number, got {threshold!r}")
    if not 0 <= min_boxes <= max_boxes or fixed_boxes < 0:
        raise ValueError(f"min_boxes, max_boxes, fixed_boxes: expected 0 <= min <= max and fixed >= 0, got {min_boxes}, {max_boxes}, {fixed_boxes}")
    order = torch.argsort(confidence, descending=True, stable=True)
    if mode == "fixed":
        return order[:fixed_boxes]
    passing = int((confidence >= threshold).sum())
    return order[: min(max(passing, min_boxes), max_boxes)]
