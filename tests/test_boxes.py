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


def test_pairwise_ops_require_a_set_of_boxes():
    box = torch.tensor([0.1, 0.1, 0.4, 0.5])
    for function in (box_iou, generalized_box_iou):
        with pytest.raises(ValueError, match=r"boxes1 must have shape \[\.\.\., N, 4\].*got \[4\]"):
            function(box, box[None])
        with pytest.raises(ValueError, match=r"boxes2 must have shape \[\.\.\., N, 4\].*got \[4\]"):
            function(box[None], box)


def test_zero_area_boxes_give_finite_iou_and_giou():
    generator = torch.Generator().manual_seed(21)
    corners = torch.rand(12, 2, generator=generator, dtype=torch.float64)
    sizes = torch.rand(12, 2, generator=generator, dtype=torch.float64) * 0.3
    sizes[:4] = 0  # points
    sizes[4:6, 0] = 0  # vertical lines
    sizes[6:8, 1] = 0  # horizontal lines
    boxes = torch.cat([corners, corners + sizes], dim=1).requires_grad_(True)
    iou, _ = box_iou(boxes, boxes.detach())
    giou = generalized_box_iou(boxes, boxes.detach())
    assert torch.isfinite(iou).all() and torch.isfinite(giou).all()
    expected_iou, expected_giou = tv_ops.box_iou(boxes, boxes), tv_ops.generalized_box_iou(boxes, boxes)
    # torchvision divides 0 by 0 where both boxes have zero area (and the enclosing box too).
    assert torch.isnan(expected_giou[:8, :8].diagonal()).all()
    defined = torch.isfinite(expected_giou)
    torch.testing.assert_close(giou[defined], expected_giou[defined])
    torch.testing.assert_close(iou[torch.isfinite(expected_iou)], expected_iou[torch.isfinite(expected_iou)])
    # A zero-area box has no overlap with anything: IoU 0. Coincident ones have GIoU 0 (no gap).
    assert torch.equal(iou[:8, :8], torch.zeros(8, 8, dtype=torch.float64))
    assert torch.equal(giou[:8, :8].diagonal(), torch.zeros(8, dtype=torch.float64))
    giou.sum().backward()
    assert torch.isfinite(boxes.grad).all() and boxes.grad.abs().max() < 1e3


def test_nan_still_propagates_and_is_reported_when_checked():
    boxes = random_xyxy(3)
    bad = boxes.clone()
    bad[1, 2] = float("nan")
    giou = generalized_box_iou(bad, boxes, check_degenerate=False)
    assert torch.isnan(giou[1]).all() and torch.isfinite(giou[[0, 2]]).all()
    assert torch.isnan(box_iou(bad, boxes)[0][1]).all()
    for value in (float("nan"), float("inf"), -float("inf")):
        bad[1, 2] = value
        with pytest.raises(ValueError, match="boxes1 has boxes with NaN or infinite coordinates"):
            generalized_box_iou(bad, boxes)
        with pytest.raises(ValueError, match="boxes2 has boxes with NaN or infinite coordinates"):
            generalized_box_iou(boxes, bad)
    # An inverted box is still reported as degenerate, naming the argument.
    inverted = boxes.clone()
    inverted[2] = torch.tensor([0.6, 0.1, 0.2, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="boxes2 has degenerate boxes"):
        generalized_box_iou(boxes, inverted)
