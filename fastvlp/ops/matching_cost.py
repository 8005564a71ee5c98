"""DETR's matching cost, built for a whole batch at once on padded targets."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from fastvlp.ops.boxes import box_cxcywh_to_xyxy, check_box_order, generalized_box_iou
from fastvlp.ops.ragged import pad_ragged, ragged_index


def check_target_labels(labels: Sequence[torch.Tensor], num_classes: int, bound: str = "") -> None:
    """Check per-image label tensors as DETR targets carry them (``targets[i]['labels']``).

    Raises ``TypeError`` naming the image for labels that are not an integer tensor (floats or
    bools would be truncated to a class silently) and, for labels on the CPU, ``ValueError``
    naming the image for a class outside ``[0, num_classes)``; ``bound`` says where that limit
    comes from. Labels on another device are not range-checked: reading them would cost a host
    sync (an out-of-range class then fails inside the indexing kernels).
    """
    for index, item in enumerate(labels):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"targets[{index}]['labels']: expected a tensor, got {type(item).__name__}")
        if item.dtype.is_floating_point or item.dtype.is_complex or item.dtype == torch.bool:
            raise TypeError(
                f"targets[{index}]['labels']: expected an integer tensor of class indices, got {item.dtype}"
            )
    on_host = [(index, item if item.dim() == 1 else item.reshape(-1)) for index, item in enumerate(labels)
               if item.device.type == "cpu" and item.numel()]
    if not on_host:
        return
    low, high = torch.aminmax(torch.cat([item.to(torch.int64) for _, item in on_host]))
    if low >= 0 and high < num_classes:
        return
    for index, item in on_host:
        bad = item[(item < 0) | (item >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"targets[{index}]['labels']: expected class indices in [0, {num_classes}){bound}, got {int(bad[0])}"
            )


def pad_targets(
    labels: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], device: torch.device,
    length: Optional[int] = None, ragged: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ragged per-image targets into ``[B, T]`` labels and ``[B, T, 4]`` cxcywh boxes,
    padded to the largest ``T`` in the batch (not the sum), or to ``length`` when given (a fixed
    shape from batch to batch), and the ``[B]`` target counts. ``ragged`` is the targets'
    :func:`~fastvlp.ops.ragged.ragged_index` on ``device`` where the caller has built it already.

    Padding boxes are ``(0.5, 0.5, 0.5, 0.5)``, a valid box, so that no NaN is computed
    even outside the extent the solver reads. Raises ``ValueError`` naming the image when
    its boxes are not ``[T, 4]`` for its ``T`` labels, and ``TypeError`` when its labels are
    not integers (integer labels of any width are read as int64).
    """
    for name, items in (("labels", labels), ("boxes", boxes)):
        if isinstance(items, torch.Tensor) or not isinstance(items, Sequence) \
                or not all(isinstance(item, torch.Tensor) for item in items):
            raise TypeError(f"{name}: expected a sequence of tensors, one per image, got {type(items).__name__}")
    if len(boxes) != len(labels):
        raise ValueError(f"boxes: expected one tensor per image like labels ({len(labels)}), got {len(boxes)}")
    for index, (item_labels, item_boxes) in enumerate(zip(labels, boxes)):
        if item_labels.dim() != 1:
            raise ValueError(f"labels[{index}]: expected shape [T], got {list(item_labels.shape)}")
        if item_labels.dtype.is_floating_point or item_labels.dtype.is_complex or item_labels.dtype == torch.bool:
            # Casting would truncate 2.7 to class 2 without a word.
            raise TypeError(f"labels[{index}]: expected an integer tensor of class indices, got {item_labels.dtype}")
        # A missing box would otherwise be padded with a valid box and matched as a real target.
        if item_boxes.shape != (len(item_labels), 4) and not (len(item_labels) == 0 and item_boxes.numel() == 0):
            got = len(item_boxes) if item_boxes.dim() == 2 and item_boxes.shape[1] == 4 else list(item_boxes.shape)
            raise ValueError(
                f"boxes[{index}]: expected {len(item_labels)} boxes like labels[{index}] (shape [T, 4]), got {got}"
            )
    sizes = [len(item) for item in labels]
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < max(sizes, default=0)):
        raise ValueError(f"length: expected an int of at least the largest target count ({max(sizes, default=0)}), "
                         f"got {length!r}")
    counts = torch.tensor(sizes, dtype=torch.int64)
    if len(labels) == 0:
        return (torch.zeros((0, length or 0), dtype=torch.int64, device=device),
                torch.full((0, length or 0, 4), 0.5, device=device), counts.to(device))
    # One concatenation and one indexed write per field, not a copy per image.
    index = ragged_index(sizes, device) if ragged is None else ragged
    flat_labels = torch.cat([item.to(device) for item in labels]).to(torch.int64)
    flat_boxes = torch.cat([item.to(device) if item.dim() == 2 else item.to(device).reshape(-1, 4) for item in boxes])
    length = max(sizes) if length is None else length
    return (pad_ragged(flat_labels, index, len(sizes), length, 0),
            pad_ragged(flat_boxes, index, len(sizes), length, 0.5), counts.to(device))


def matching_cost(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_boxes: torch.Tensor,
    cost_class: float = 1.0,
    cost_bbox: float = 1.0,
    cost_giou: float = 1.0,
) -> torch.Tensor:
    """``[B, Q, T]`` float32 cost between predictions and (padded) targets.

    ``cost_class * -p(label) + cost_bbox * L1(cxcywh) + cost_giou * -GIoU``, as DETR
    defines it, computed in float32 even under autocast: a bf16 cost would reorder
    near-tied matches from one step to the next.

    On the CPU, boxes with a negative width or height raise ``ValueError`` naming
    ``pred_boxes`` or ``target_boxes`` (on CUDA that check would cost a host sync, so it is
    skipped). Boxes with NaN or infinite coordinates are left alone on both devices: the
    cost they give (NaN) is then judged by the solver, which raises or, with
    ``check_finite=False``, leaves that problem unsolved.
    """
    for name, value in (("pred_logits", pred_logits), ("pred_boxes", pred_boxes), ("target_labels", target_labels),
                        ("target_boxes", target_boxes)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if pred_logits.dim() != 3:
        raise ValueError(f"pred_logits must be [B, Q, C], got {list(pred_logits.shape)}")
    if pred_boxes.shape != (*pred_logits.shape[:2], 4):
        raise ValueError(f"pred_boxes must be [B, Q, 4] matching pred_logits, got {list(pred_boxes.shape)}")
    if target_labels.dim() != 2 or target_boxes.shape != (*target_labels.shape, 4):
        raise ValueError(
            f"target_labels must be [B, T] and target_boxes [B, T, 4], got {list(target_labels.shape)} "
            f"and {list(target_boxes.shape)}"
        )
    if target_labels.shape[0] != pred_logits.shape[0]:
        raise ValueError(f"target_labels: expected the batch size of pred_logits ({pred_logits.shape[0]}), "
                         f"got {target_labels.shape[0]}")
    if target_labels.dtype.is_floating_point or target_labels.dtype.is_complex or target_labels.dtype == torch.bool:
        raise TypeError(f"target_labels: expected an integer tensor, got {target_labels.dtype}")
    with torch.autocast(device_type=pred_logits.device.type, enabled=False):
        probabilities = pred_logits.float().softmax(-1)
        index = target_labels[:, None, :].expand(-1, probabilities.shape[1], -1)
        class_cost = -probabilities.gather(2, index)
        predicted = pred_boxes.float()
        targets = target_boxes.float()
        bbox_cost = torch.cdist(predicted, targets, p=1) if targets.shape[1] else predicted.new_zeros(class_cost.shape)
        predicted_xyxy, targets_xyxy = box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(targets)
        if predicted.device.type == "cpu":  # reading the data is free on the CPU, a host sync on CUDA
            check_box_order("pred_boxes", predicted_xyxy, skip_non_finite=True)
            check_box_order("target_boxes", targets_xyxy, skip_non_finite=True)
        giou_cost = -generalized_box_iou(predicted_xyxy, targets_xyxy, check_degenerate=False)
        return cost_bbox * bbox_cost + cost_class * class_cost + cost_giou * giou_cost
