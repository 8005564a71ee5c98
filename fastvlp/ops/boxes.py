"""Box conversions and (generalized) IoU, broadcasting over leading batch dimensions.

torchvision's ``box_iou``/``generalized_box_iou`` take ``[N, 4]`` x ``[M, 4]`` only; the
batched matcher needs ``[B, N, 4]`` x ``[B, M, 4]`` without building a ``[B*N, B*M]``
matrix, hence these versions (tested against torchvision's). Unlike torchvision's, a zero
union or enclosing area does not give NaN (see :func:`box_iou`).
"""
from __future__ import annotations

from typing import Tuple

import torch


def _check_boxes(name: str, boxes: torch.Tensor) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {list(boxes.shape)}")


def _check_pairwise(name: str, boxes: torch.Tensor) -> None:
    _check_boxes(name, boxes)
    if boxes.dim() < 2:
        raise ValueError(f"{name} must have shape [..., N, 4] (a 2-D or batched set of boxes), got {list(boxes.shape)}")


def _nonzero(denominator: torch.Tensor) -> torch.Tensor:
    # A zero union or enclosing area (zero-area boxes) comes with a zero numerator, so 0 / 0 would
    # be NaN (torchvision gives NaN there). Any positive stand-in gives 0 instead; 1 rather than a
    # tiny eps keeps the gradient bounded (1 / eps would reach 1e37 for line-shaped boxes). Only
    # exact zeros are replaced: NaN still propagates and every other value is unchanged.
    return denominator.masked_fill(denominator == 0, 1)


def check_box_order(name: str, boxes: torch.Tensor, *, skip_non_finite: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` for ``xyxy`` boxes with ``x1 < x0`` or ``y1 < y0``
    and, unless ``skip_non_finite``, for NaN or infinite coordinates. It reads the data, so on
    CUDA it synchronises with the host."""
    low, high = boxes[..., :2], boxes[..., 2:]
    finite = torch.isfinite(low) & torch.isfinite(high)
    inverted = (high < low) & finite
    if skip_non_finite:
        if bool(inverted.any()):
            raise ValueError(f"{name} has degenerate boxes (x1 < x0 or y1 < y0)")
        return
    any_inverted, any_non_finite = torch.stack((inverted.any(), ~finite.all())).tolist()  # one sync
    if any_non_finite:
        raise ValueError(f"{name} has boxes with NaN or infinite coordinates")
    if any_inverted:
        raise ValueError(f"{name} has degenerate boxes (x1 < x0 or y1 < y0)")


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
    """Pairwise IoU of ``xyxy`` boxes ``[..., N, 4]`` and ``[..., M, 4]`` -> ``([..., N, M], union)``.

    A pair with zero union (two zero-area boxes) has IoU 0; torchvision gives NaN.
    """
    _check_pairwise("boxes1", boxes1)
    _check_pairwise("boxes2", boxes2)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - intersection
    return intersection / _nonzero(union), union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, check_degenerate: bool = True) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of ``xyxy`` boxes.

    ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``, leading dimensions broadcast.
    With ``check_degenerate``, degenerate boxes (``x1 < x0`` or ``y1 < y0``) and boxes with NaN or
    infinite coordinates raise ``ValueError`` naming the argument (the check reads the data, so on
    CUDA it synchronises). Two zero-area boxes give a finite GIoU (0 when they coincide), where
    torchvision's gives NaN: a zero union or enclosing area is divided as if it were 1.
    """
    _check_pairwise("boxes1", boxes1)
    _check_pairwise("boxes2", boxes2)
    if check_degenerate:
        check_box_order("boxes1", boxes1)
        check_box_order("boxes2", boxes2)
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    enclosing_area = extent[..., 0] * extent[..., 1]
    return iou - (enclosing_area - union) / _nonzero(enclosing_area)
