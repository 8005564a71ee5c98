"""fastvlp.nn.HungarianMatcher against a plain per-image scipy matcher, and DETR's own checks."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsap

from fastvlp.nn import HungarianMatcher
from fastvlp.ops import box_cxcywh_to_xyxy, generalized_box_iou
from fastvlp.ops.matching_cost import matching_cost, pad_targets


def plain_detr_cost(logits, boxes, labels, target_boxes, cost_class, cost_bbox, cost_giou, check_boxes=True):
    """DETR's cost for one image, written out in float64."""
    probabilities = logits.double().softmax(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes.double()), box_cxcywh_to_xyxy(target_boxes.double()),
                               check_degenerate=check_boxes)
    return cost_bbox * torch.cdist(boxes.double(), target_boxes.double(), p=1) - cost_class * probabilities[:, labels] \
        - cost_giou * giou


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
def test_matches_plain_reference(counts, backend, fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    outputs, targets = random_problem(len(counts), 30, 11, counts, generator)
    matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2, backend=backend)
    matches = matcher(outputs, targets)
    assert len(matches) == len(counts)
    for index, (rows, cols) in enumerate(matches):
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(30, counts[index])
        assert torch.equal(rows, rows.sort().values)
        assert len(set(rows.tolist())) == len(rows) and ((rows >= 0) & (rows < 30)).all()
        # Each target is matched at most once, and only to a target of this image.
        assert len(set(cols.tolist())) == len(cols), f"image {index}: a target matched twice: {cols.tolist()}"
        assert ((cols >= 0) & (cols < counts[index])).all(), f"image {index}: columns {cols.tolist()}"
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


def bf16_model_outputs(outputs, device):
    """The predictions as a bf16 model under autocast hands them to the matcher."""
    return {key: value.to(device, torch.bfloat16) for key, value in outputs.items()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cost_is_float32_for_bf16_predictions_under_autocast(device, fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    counts = [4, 6, 0]
    outputs, targets = random_problem(len(counts), 20, 5, counts, generator)
    predictions = bf16_model_outputs(outputs, device)
    labels, boxes, _ = pad_targets([t["labels"] for t in targets], [t["boxes"] for t in targets], torch.device(device))
    with torch.autocast(device, dtype=torch.bfloat16):
        cost = matching_cost(predictions["pred_logits"], predictions["pred_boxes"], labels, boxes, 1, 5, 2)
    assert cost.dtype == torch.float32 and cost.shape == (len(counts), 20, max(counts))
    for index, count in enumerate(counts):
        # The same bf16 values, costed in float64: only float32 rounding may separate them
        # (a bf16 cost is off by about 1e-2).
        expected = plain_detr_cost(predictions["pred_logits"][index].cpu(), predictions["pred_boxes"][index].cpu(),
                                   targets[index]["labels"], targets[index]["boxes"], 1, 5, 2)
        torch.testing.assert_close(cost[index, :, :count].cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_matches_for_bf16_predictions_under_autocast(fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    counts = [4, 6, 9]
    outputs, targets = random_problem(len(counts), 20, 5, counts, generator)
    predictions = bf16_model_outputs(outputs, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matches = HungarianMatcher(1, 5, 2)(predictions, targets)
    for index, (rows, cols) in enumerate(matches):
        cost = plain_detr_cost(predictions["pred_logits"][index], predictions["pred_boxes"][index],
                               targets[index]["labels"], targets[index]["boxes"], 1, 5, 2)
        expected_rows, expected_cols = scipy_lsap(cost.numpy())
        assert cost[rows, cols].sum().item() == pytest.approx(cost[expected_rows, expected_cols].sum().item(), rel=1e-5)


def test_nan_cost_without_check_finite_gets_valid_placeholder_matches(fresh_seed):
    generator = torch.Generator().manual_seed(fresh_seed)
    counts = [5, 12, 3, 0]
    outputs, targets = random_problem(len(counts), 8, 4, counts, generator)
    outputs["pred_logits"][1, 6, 2] = float("nan")  # a NaN prediction: image 1's cost row is NaN
    outputs["pred_logits"][2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"invalid numeric entries \(problem 1\)"):
        HungarianMatcher(1, 5, 2)(outputs, targets)
    matches = HungarianMatcher(1, 5, 2, check_finite=False)(outputs, targets)
    for index in (1, 2):  # Q < T and Q > T
        rows, cols = matches[index]
        expected = torch.arange(min(8, counts[index]))
        assert torch.equal(rows, expected) and torch.equal(cols, expected)
    assert len(matches[3][0]) == len(matches[3][1]) == 0
    # The finite image is solved as usual.
    rows, cols = matches[0]
    cost = plain_detr_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                           targets[0]["labels"], targets[0]["boxes"], 1, 5, 2)
    expected_rows, expected_cols = scipy_lsap(cost.numpy())
    assert cost[rows, cols].sum().item() == pytest.approx(cost[expected_rows, expected_cols].sum().item(), rel=1e-5)


@pytest.mark.parametrize("check_finite", [True, False])
def test_scipy_backend_raises_on_nan_cost_either_way(check_finite, fresh_seed):
    """Documented: backend="scipy" is DETR's path, which raises scipy's error on a NaN cost
    whatever check_finite says."""
    generator = torch.Generator().manual_seed(fresh_seed)
    counts = [5, 12, 0]
    outputs, targets = random_problem(len(counts), 8, 4, counts, generator)
    matcher = HungarianMatcher(1, 5, 2, backend="scipy", check_finite=check_finite)
    # Finite costs first: the scipy backend solves them optimally (against the float64 cost).
    for index, (rows, cols) in enumerate(matcher(outputs, targets)):
        assert len(rows) == len(cols) == min(8, counts[index])
        if counts[index]:
            cost = plain_detr_cost(outputs["pred_logits"][index], outputs["pred_boxes"][index],
                                   targets[index]["labels"], targets[index]["boxes"], 1, 5, 2)
            expected_rows, expected_cols = scipy_lsap(cost.numpy())
            total = cost[expected_rows, expected_cols].sum().item()
            assert cost[rows, cols].sum().item() == pytest.approx(total, rel=1e-5)
    outputs["pred_logits"][1, 6, 2] = float("nan")  # image 1's cost row 6 is NaN
    with pytest.raises(ValueError, match="^matrix contains invalid numeric entries$"):
        matcher(outputs, targets)


def test_pad_targets_rejects_boxes_that_do_not_match_labels():
    labels = [torch.tensor([1, 2]), torch.tensor([0, 3, 1])]
    boxes = [torch.rand(2, 4) * 0.5 + 0.2, torch.rand(2, 4) * 0.5 + 0.2]
    with pytest.raises(ValueError, match=r"boxes\[1\]: expected 3 boxes like labels\[1\].*got 2"):
        pad_targets(labels, boxes, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"boxes\[0\]: expected 2 boxes like labels\[0\].*got \[8\]"):
        pad_targets(labels[:1], [torch.rand(8)], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"boxes: expected one tensor per image like labels \(2\), got 1"):
        pad_targets(labels, boxes[:1], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"labels\[0\]: expected shape \[T\]"):
        pad_targets([torch.tensor([[1, 2]])], [torch.rand(2, 4)], torch.device("cpu"))
    outputs, targets = random_problem(2, 5, 3, [2, 3], torch.Generator().manual_seed(1))
    targets[1]["boxes"] = targets[1]["boxes"][:2]
    with pytest.raises(ValueError, match=r"boxes\[1\]: expected 3 boxes"):
        HungarianMatcher()(outputs, targets)
    # An image without targets may carry its boxes as an empty tensor of any shape.
    padded_labels, padded_boxes, counts = pad_targets([labels[0], torch.zeros(0, dtype=torch.int64)],
                                                      [boxes[0], torch.zeros(0)], torch.device("cpu"))
    assert counts.tolist() == [2, 0] and padded_boxes.shape == (2, 2, 4)
    torch.testing.assert_close(padded_boxes[0], boxes[0])
    assert torch.equal(padded_labels[0], labels[0])


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="can't all be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        HungarianMatcher(backend="lapjv")
    outputs, targets = random_problem(2, 5, 3, [1, 1], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="targets must hold one dict per image"):
        HungarianMatcher()(outputs, targets[:1])


def test_matching_cost_and_pad_targets_name_bad_arguments():
    logits, boxes = torch.randn(2, 3, 5), torch.rand(2, 3, 4) * 0.2 + 0.3
    labels, target_boxes = torch.randint(0, 5, (1, 4)), torch.rand(1, 4, 4) * 0.2 + 0.3
    # One image's targets for a batch of two would pair image 1's predictions with image 0's targets.
    with pytest.raises(ValueError, match="target_labels: expected the batch size of pred_logits"):
        matching_cost(logits, boxes, labels, target_boxes)
    with pytest.raises(TypeError, match="target_labels: expected an integer tensor"):
        matching_cost(logits, boxes, labels.expand(2, -1).float(), target_boxes.expand(2, -1, -1))
    with pytest.raises(TypeError, match="pred_logits: expected a torch.Tensor"):
        matching_cost(logits.numpy(), boxes, labels, target_boxes)
    with pytest.raises(TypeError, match="labels: expected a sequence of tensors"):
        pad_targets([[1, 2]], [torch.rand(2, 4)], torch.device("cpu"))
    with pytest.raises(TypeError, match="boxes: expected a sequence of tensors"):
        pad_targets([torch.tensor([1])], torch.rand(1, 1, 4), torch.device("cpu"))


def scipy_rejects(cost):
    try:
        scipy_lsap(cost.numpy())
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_predicted_boxes_follow_check_finite(value, device):
    """A NaN or infinite predicted box is judged by the solver on every device: with check_finite it
    raises scipy's error for the first image scipy rejects, without it that image gets placeholders."""
    generator = torch.Generator().manual_seed(31)
    counts = [4, 6, 0, 3, 9]
    outputs, targets = random_problem(len(counts), 8, 5, counts, generator)
    outputs["pred_boxes"][1, 3, 0] = value  # a centre
    outputs["pred_boxes"][3, 5, 2] = value  # a width
    outputs["pred_boxes"][4, 0, 1] = value
    costs = [plain_detr_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i]["labels"],
                             targets[i]["boxes"], 1, 5, 2, check_boxes=False) for i in range(len(counts))]
    rejected = [i for i, count in enumerate(counts) if count and scipy_rejects(costs[i])]
    assert 1 in rejected  # a non-finite centre always makes a NaN cost row
    on_device = {key: value.to(device) for key, value in outputs.items()}
    with pytest.raises(ValueError, match=rf"invalid numeric entries \(problem {rejected[0]}\)"):
        HungarianMatcher(1, 5, 2)(on_device, targets)
    matches = HungarianMatcher(1, 5, 2, check_finite=False)(on_device, targets)
    for index, (rows, cols) in enumerate(matches):
        assert rows.device.type == device and len(rows) == len(cols) == min(8, counts[index])
        rows, cols = rows.cpu(), cols.cpu()
        if index in rejected:
            expected = torch.arange(min(8, counts[index]))
            assert torch.equal(rows, expected) and torch.equal(cols, expected)
        elif counts[index]:
            expected_rows, expected_cols = scipy_lsap(costs[index].numpy())
            total = costs[index][expected_rows, expected_cols].sum().item()
            assert costs[index][rows, cols].sum().item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_match_like_int64(dtype):
    generator = torch.Generator().manual_seed(41)
    outputs, targets = random_problem(3, 10, 6, [5, 0, 12], generator)
    narrow = [dict(target, labels=target["labels"].to(dtype)) for target in targets]
    expected = HungarianMatcher(1, 5, 2)(outputs, targets)
    for (rows, cols), (expected_rows, expected_cols) in zip(HungarianMatcher(1, 5, 2)(outputs, narrow), expected):
        assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)


def test_bad_labels_and_boxes_are_named():
    generator = torch.Generator().manual_seed(43)
    outputs, targets = random_problem(3, 6, 4, [2, 3, 1], generator)  # 5 logits per query
    for bad_dtype in (torch.float32, torch.bool):
        bad = [dict(target) for target in targets]
        bad[1]["labels"] = bad[1]["labels"].to(bad_dtype)
        with pytest.raises(TypeError, match=r"targets\[1\]\['labels'\]: expected an integer tensor"):
            HungarianMatcher()(outputs, bad)
        with pytest.raises(TypeError, match=r"labels\[1\]: expected an integer tensor"):
            pad_targets([t["labels"] for t in bad], [t["boxes"] for t in bad], torch.device("cpu"))
    for label in (5, -1):
        bad = [dict(target) for target in targets]
        bad[2]["labels"] = torch.tensor([label])
        expected = rf"targets\[2\]\['labels'\]: expected class indices in \[0, 5\).*got {label}"
        with pytest.raises(ValueError, match=expected):
            HungarianMatcher()(outputs, bad)
    bad = [dict(target) for target in targets]
    bad[0]["boxes"] = bad[0]["boxes"].clone()
    bad[0]["boxes"][1, 3] = -0.1  # a negative height
    with pytest.raises(ValueError, match="target_boxes has degenerate boxes"):
        HungarianMatcher()(outputs, bad)
