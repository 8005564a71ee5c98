"""UNITER's 7-d box features."""
from __future__ import annotations

import torch
from torch import Tensor


def box_features(boxes: Tensor, image_size) -> Tensor:
    """``[N, 7]``: (x1, y1, x2, y2, w, h, w*h) of ``boxes`` ``[N, 4]`` (x1, y1, x2, y2 in pixels) divided by the
    image's width, height and area; ``image_size`` is ``(H, W)``."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected a tensor [N, 4], got {getattr(boxes, 'shape', type(boxes))}")
    height, width = (float(side) for side in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size: expected a positive (H, W), got {tuple(image_size)}")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return torch.stack((x1 / width, y1 / height, x2 / width, y2 / height, w, h, w * h), dim=1)
