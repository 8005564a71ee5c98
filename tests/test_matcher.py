"""fastvlp.nn.HungarianMatcher against a plain per-image scipy matcher, and DETR's own checks."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsap

from fastvlp.nn import HungarianMatcher
from fastvlp.ops import box_cxcywh_to_xyxy, generalized_box_iou


def plain_detr_cost(logits, boxes, labels, target_boxes, cost_class, cost_bbox, cost_giou):
    """DETR's cost for one image, written out in float64."""
    probabilities = logits.double().softmax(-1)
    return (
        cost_bbox * torch.cdist(boxes.double(), target_boxes.double(), p=1)
        - cost_class * probabilities[:, labels]
        - cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes.double()), box_cxcywh_to_xyxy(target_boxes.double()))
    )


def random_problem(batch, queries, classes, counts, generator):
    outputs = {
        "pred_logits": torch.randn(batch, queries, classes + 1, generator=generator),
        "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.2,
    }
    targets = [
        {"labels": torch.randint(0, classes, (count,), generator=generator),
         "boxes": torch.rand(count, 4, generator=generator) * 0.5 + 0.2,
         "image_id": torch.tensor(index)}  # extra keys are allowed
        for index, count in enumerate(counts)
    ]
    return outputs, targets


@pytest.mark.parametrize("counts", [[3, 0, 15, 100], [0, 0], [7]])
@pytest.mark.parametrize("backend", ["fastvlp", "scipy"])
def test_matches_plain_reference(counts, backend):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    outputs, targets = random_problem(len(counts), 30, 11, counts, generator)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, backend=backend)
    matches = matcher(outputs, targets)
    assert len(matches) == len(counts)
    for index, (rows, cols) in enumerate(matches):
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(30, counts[index])
        assert torch.equal(rows, rows.sort().values)
        if counts[index] == 0:
            continue
        cost = plain_detr_cost(outputs["pred_logits"][index], outputs["pred_boxes"][index],
                               targets[index]["labels"], targets[index]["boxes"], 1, 5, 2)
        expected_rows, expected_cols = scipy_lsap(cost.numpy())
        assert cost[rows, cols].sum().item() == pytest.approx(cost[expected_rows, expected_cols].sum().item(), rel=1e-5)


def test_detr_hungarian_contract():
    """The checks of DETR's ``test_hungarian`` (test_all.py), on this matcher with DETR's defaults."""
    queries, num_targets, classes = 100, 15, 91
    logits, boxes = torch.rand(1, queries, classes + 1), torch.rand(1, queries, 4)
    targets = [{"labels": torch.randint(high=classes, size=(num_targets,)), "boxes": torch.rand(num_targets, 4)}]
    matcher = HungarianMatcher()
    single = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    batched = matcher({"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}, targets * 2)
    assert len(single[0][0]) == num_targets and len(single[0][1]) == num_targets
    as_lists = [(i.tolist(), j.tolist()) for i, j in single]
    assert as_lists == [(batched[0][0].tolist(), batched[0][1].tolist())]
    assert as_lists == [(batched[1][0].tolist(), batched[1][1].tolist())]
    empty = [{"labels": torch.randint(high=classes, size=(0,)), "boxes": torch.rand(0, 4)}]
    mixed = matcher({"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}, targets + empty)
    assert len(mixed[1][0]) == 0
    none = matcher({"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}, empty * 2)
    assert len(none[0][0]) == 0


def test_cost_is_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(3)
    outputs, targets = random_problem(2, 20, 5, [4, 6], generator)
    reference = HungarianMatcher(1, 5, 2)(outputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = HungarianMatcher(1, 5, 2)(outputs, targets)
    for (rows, cols), (rows_ref, cols_ref) in zip(under_autocast, reference):
        assert torch.equal(rows, rows_ref) and torch.equal(cols, cols_ref)


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="can't all be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        HungarianMatcher(backend="lapjv")
    outputs, targets = random_problem(2, 5, 3, [1, 1], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="targets must hold one dict per image"):
        HungarianMatcher()(outputs, targets[:1])
