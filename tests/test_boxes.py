"""Box conversions and (generalized) IoU against torchvision, in float64."""
import pytest
import torch
import torchvision.ops as tv_ops

from fastvlp.ops import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou


def random_xyxy(*shape):
    corner = torch.rand(*shape, 2, dtype=torch.float64)
    size = torch.rand(*shape, 2, dtype=torch.float64) * 0.5
    return torch.cat([corner, corner + size], dim=-1)


def test_conversions_round_trip_and_match_torchvision():
    boxes = torch.rand(3, 11, 4, dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    flat = boxes.reshape(-1, 4)
    torch.testing.assert_close(box_cxcywh_to_xyxy(flat), tv_ops.box_convert(flat, "cxcywh", "xyxy"))
    xyxy = random_xyxy(7)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), tv_ops.box_convert(xyxy, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_area(xyxy), tv_ops.box_area(xyxy))


def test_batched_iou_and_giou_match_torchvision_per_image():
    first, second = random_xyxy(4, 9), random_xyxy(4, 6)
    iou, _ = box_iou(first, second)
    giou = generalized_box_iou(first, second)
    assert giou.shape == (4, 9, 6)
    for index in range(4):
        torch.testing.assert_close(iou[index], tv_ops.box_iou(first[index], second[index]))
        torch.testing.assert_close(giou[index], tv_ops.generalized_box_iou(first[index], second[index]))


def test_giou_identical_and_disjoint():
    box = torch.tensor([[0.1, 0.1, 0.4, 0.5]], dtype=torch.float64)
    assert generalized_box_iou(box, box).item() == pytest.approx(1.0)
    far = torch.tensor([[0.6, 0.6, 0.9, 0.9]], dtype=torch.float64)
    # disjoint: IoU 0, GIoU = -(enclosing - union) / enclosing
    enclosing = 0.8 * 0.8
    union = 0.3 * 0.4 + 0.3 * 0.3
    assert generalized_box_iou(box, far).item() == pytest.approx(-(enclosing - union) / enclosing)


def test_empty_and_errors():
    assert generalized_box_iou(random_xyxy(0), random_xyxy(5)).shape == (0, 5)
    with pytest.raises(ValueError, match="boxes1 has degenerate boxes"):
        generalized_box_iou(torch.tensor([[0.5, 0.5, 0.2, 0.9]]), random_xyxy(2).float())
    with pytest.raises(ValueError, match=r"boxes must have shape \[..., 4\]"):
        box_cxcywh_to_xyxy(torch.rand(3, 5))
    with pytest.raises(TypeError, match="boxes2 must be a torch.Tensor"):
        box_iou(random_xyxy(2), [[0, 0, 1, 1]])
