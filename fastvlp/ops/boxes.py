"""Box conversions and (generalized) IoU, broadcasting over leading batch dimensions.

torchvision's ``box_iou``/``generalized_box_iou`` take ``[N, 4]`` x ``[M, 4]`` only; the
batched matcher needs ``[B, N, 4]`` x ``[B, M, 4]`` without building a ``[B*N, B*M]``
matrix, hence these versions (tested against torchvision's).
"""
from __future__ import annotations

from typing import Tuple

import torch


def _check_boxes(name: str, boxes: torch.Tensor) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {list(boxes.shape)}")


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w, h)`` to ``(x0, y0, x1, y1)``, over any leading dimensions."""
    _check_boxes("boxes", boxes)
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        (center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height), dim=-1
    )


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(x0, y0, x1, y1)`` to ``(cx, cy, w, h)``, over any leading dimensions."""
    _check_boxes("boxes", boxes)
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes ``[..., 4]`` -> ``[...]``."""
    _check_boxes("boxes", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU of ``xyxy`` boxes ``[..., N, 4]`` and ``[..., M, 4]`` -> ``([..., N, M], union)``."""
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - intersection
    return intersection / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, check_degenerate: bool = True) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of ``xyxy`` boxes.

    ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``, leading dimensions broadcast.
    Degenerate boxes (``x1 < x0`` or ``y1 < y0``) raise ``ValueError`` when
    ``check_degenerate`` (the check reads the data, so on CUDA it synchronises).
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if check_degenerate and not bool((boxes[..., 2:] >= boxes[..., :2]).all()):
            raise ValueError(f"{name} has degenerate boxes (x1 < x0 or y1 < y0)")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    enclosing_area = extent[..., 0] * extent[..., 1]
    return iou - (enclosing_area - union) / enclosing_area
