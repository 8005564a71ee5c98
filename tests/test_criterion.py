"""SetCriterion against a plain per-image float64 reference (scipy matching, explicit loss formulas)."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou as torchvision_giou

from fastvlp.nn.criterion import SetCriterion, build_weight_dict
from fastvlp.nn.matcher import HungarianMatcher
from fastvlp.ops.boxes import box_cxcywh_to_xyxy

NUM_CLASSES, NUM_ATTRIBUTES = 5, 4
COSTS = (1.0, 5.0, 2.0)
EOS = 0.1


def random_boxes(count, generator, dtype=torch.float64):
    centers = torch.rand(count, 2, generator=generator, dtype=dtype) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=generator, dtype=dtype) * 0.3 + 0.05
    return torch.cat((centers, sizes), dim=1)


def random_layer(batch, queries, generator, dtype):
    return {
        "pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=generator, dtype=dtype) * 2,
        "pred_boxes": random_boxes(batch * queries, generator, dtype).reshape(batch, queries, 4),
        "pred_attributes": torch.randn(batch, queries, NUM_ATTRIBUTES, generator=generator, dtype=dtype),
    }


def random_targets(counts, generator, with_attributes=True):
    targets = []
    for index, count in enumerate(counts):
        target = {
            "labels": torch.randint(NUM_CLASSES, (count,), generator=generator),
            "boxes": random_boxes(count, generator, torch.float32),
        }
        if with_attributes and index != 1:  # image 1 carries no attribute annotations at all
            attributes = torch.rand(count, NUM_ATTRIBUTES, generator=generator) < 0.4
            if count:
                attributes[0] = False  # an object without attributes must not count
            target["attributes"] = attributes
        targets.append(target)
    return targets


def make_outputs(num_layers, batch, queries, generator, dtype=torch.float64):
    layers = [random_layer(batch, queries, generator, dtype) for _ in range(num_layers)]
    for layer in layers:
        for value in layer.values():
            value.requires_grad_(True)
    outputs = dict(layers[-1])
    outputs["aux_outputs"] = layers[:-1]
    return outputs, layers


def reference_layer_losses(layer, targets, attribute_loss):
    """Per-image loop in float64: scipy matching on DETR's cost, then each loss by its formula."""
    logits_all = layer["pred_logits"].double()
    boxes_all = layer["pred_boxes"].double()
    attributes_all = layer["pred_attributes"].double()
    class_weight = torch.ones(NUM_CLASSES + 1, dtype=torch.float64)
    class_weight[-1] = EOS
    ce_sum = ce_weight = l1 = giou_loss = attribute_sum = 0.0
    num_boxes = sum(len(t["labels"]) for t in targets)
    num_attribute_objects = sum(int(t["attributes"].any(1).sum()) for t in targets if "attributes" in t)
    for image, target in enumerate(targets):
        logits, boxes = logits_all[image], boxes_all[image]
        labels, target_boxes = target["labels"], target["boxes"].double()
        classes = torch.full((logits.shape[0],), NUM_CLASSES, dtype=torch.int64)
        if len(labels):
            probabilities = logits.detach().softmax(-1)
            cost = (
                -COSTS[0] * probabilities[:, labels]
                + COSTS[1] * torch.cdist(boxes.detach(), target_boxes, p=1)
                - COSTS[2] * torchvision_giou(box_cxcywh_to_xyxy(boxes.detach()), box_cxcywh_to_xyxy(target_boxes))
            )
            rows, cols = linear_sum_assignment(cost.numpy())
            rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
            classes[rows] = labels[cols]
            l1 = l1 + (boxes[rows] - target_boxes[cols]).abs().sum()
            giou = torchvision_giou(box_cxcywh_to_xyxy(boxes[rows]), box_cxcywh_to_xyxy(target_boxes[cols]))
            giou_loss = giou_loss + (1 - giou.diagonal()).sum()
            if "attributes" in target:
                for row, col in zip(rows.tolist(), cols.tolist()):
                    wanted = target["attributes"][col]
                    if not wanted.any():
                        continue
                    if attribute_loss == "softmax":
                        attribute_sum = attribute_sum - F.log_softmax(attributes_all[image, row], -1)[wanted].mean()
                    else:
                        attribute_sum = attribute_sum + F.binary_cross_entropy_with_logits(
                            attributes_all[image, row], wanted.double(), reduction="sum"
                        )
        log_probabilities = F.log_softmax(logits, -1)
        for query, cls in enumerate(classes.tolist()):
            ce_sum = ce_sum - class_weight[cls] * log_probabilities[query, cls]
            ce_weight = ce_weight + class_weight[cls]
    return {
        "loss_ce": ce_sum / ce_weight,
        "loss_bbox": l1 / max(num_boxes, 1),
        "loss_giou": giou_loss / max(num_boxes, 1),
        "loss_attr": attribute_sum / max(num_attribute_objects, 1),
    }


def reference_losses(layers, targets, attribute_loss):
    """Final layer without suffix, auxiliary layer i with ``_i`` (layers in decoder order)."""
    losses = dict(reference_layer_losses(layers[-1], targets, attribute_loss))
    for index, layer in enumerate(layers[:-1]):
        losses.update({f"{k}_{index}": v for k, v in reference_layer_losses(layer, targets, attribute_loss).items()})
    return losses


def make_criterion(backend="fastvlp", attribute_loss="softmax", num_aux=2, **kwargs):
    matcher = HungarianMatcher(*COSTS, backend=backend)
    weights = build_weight_dict(1.0, 5.0, 2.0, 0.7, num_aux_layers=num_aux)
    return SetCriterion(
        NUM_CLASSES, matcher, weights, EOS, ("labels", "boxes", "cardinality", "attributes"),
        attribute_loss=attribute_loss, **kwargs,
    )


@pytest.mark.parametrize("attribute_loss", ["softmax", "bce"])
@pytest.mark.parametrize("backend", ["fastvlp", "scipy"])
def test_losses_and_gradients_match_reference(attribute_loss, backend):
    generator = torch.Generator().manual_seed(11)
    # Images with 0, 3, 7 (more than the 6 queries) and 2 targets.
    targets = random_targets([0, 3, 7, 2], generator)
    outputs, layers = make_outputs(3, 4, 6, generator)
    criterion = make_criterion(backend, attribute_loss)
    losses = criterion(outputs, targets)
    expected = reference_losses(layers, targets, attribute_loss)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], torch.as_tensor(value, dtype=torch.float64), rtol=1e-10, atol=1e-12, msg=name)

    total = criterion.weighted_total(losses)
    expected_total = sum(criterion.weight_dict[name] * value for name, value in expected.items())
    torch.testing.assert_close(total, expected_total, rtol=1e-10, atol=1e-12)
    tensors = [t for layer in layers for t in layer.values()]
    grads = torch.autograd.grad(total, tensors, allow_unused=True)
    expected_grads = torch.autograd.grad(expected_total, tensors, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_float32_inputs_agree_with_float64_reference():
    generator = torch.Generator().manual_seed(3)
    targets = random_targets([4, 2, 5], generator)
    outputs, layers = make_outputs(2, 3, 8, generator, dtype=torch.float32)
    losses = make_criterion(num_aux=1)(outputs, targets)
    for name, value in reference_losses(layers, targets, "softmax").items():
        torch.testing.assert_close(losses[name].double(), torch.as_tensor(value, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_logging_values():
    generator = torch.Generator().manual_seed(5)
    targets = random_targets([2, 3], generator)
    outputs, _ = make_outputs(1, 2, 4, generator)
    losses = make_criterion(num_aux=0)(outputs, targets)
    predicted = (outputs["pred_logits"].argmax(-1) != NUM_CLASSES).sum(1).double()
    torch.testing.assert_close(losses["cardinality_error"].double(), (predicted - torch.tensor([2.0, 3.0], dtype=torch.float64)).abs().mean())
    assert 0.0 <= float(losses["class_error"]) <= 100.0
    assert "class_error_0" not in losses  # logged for the last layer only


def test_layers_matched_together_equal_separately():
    generator = torch.Generator().manual_seed(7)
    targets = random_targets([3, 0, 5], generator)
    outputs, _ = make_outputs(4, 3, 7, generator)
    together = make_criterion(num_aux=3, match_layers_together=True)(outputs, targets)
    separately = make_criterion(num_aux=3, match_layers_together=False)(outputs, targets)
    assert together.keys() == separately.keys()
    for name in together:
        torch.testing.assert_close(together[name], separately[name], rtol=0, atol=0)


def test_no_targets_anywhere():
    generator = torch.Generator().manual_seed(9)
    targets = random_targets([0, 0], generator)
    outputs, layers = make_outputs(2, 2, 5, generator)
    losses = make_criterion(num_aux=1)(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0 and losses["loss_attr"].item() == 0.0
    expected_ce = F.cross_entropy(layers[-1]["pred_logits"].reshape(-1, NUM_CLASSES + 1), torch.full((10,), NUM_CLASSES))
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    make_criterion(num_aux=1).weighted_total(losses).backward()  # an empty match still backpropagates


def test_targets_without_attribute_key_are_skipped():
    generator = torch.Generator().manual_seed(13)
    targets = random_targets([2, 3], generator, with_attributes=False)
    outputs, _ = make_outputs(1, 2, 4, generator)
    losses = make_criterion(num_aux=0)(outputs, targets)
    assert losses["loss_attr"].item() == 0.0


def test_weight_dict_layout():
    weights = build_weight_dict(1, 5, 2, 0.5, num_aux_layers=2)
    assert weights == {
        "loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_attr": 0.5,
        "loss_ce_0": 1.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0, "loss_attr_0": 0.5,
        "loss_ce_1": 1.0, "loss_bbox_1": 5.0, "loss_giou_1": 2.0, "loss_attr_1": 0.5,
    }
    assert "loss_attr" not in build_weight_dict(1, 5, 2)


def test_invalid_arguments():
    matcher = HungarianMatcher(*COSTS)
    with pytest.raises(ValueError, match="losses"):
        SetCriterion(NUM_CLASSES, matcher, {}, losses=("masks",))
    with pytest.raises(ValueError, match="num_classes"):
        SetCriterion(0, matcher, {})
    with pytest.raises(ValueError, match="attribute_loss"):
        SetCriterion(NUM_CLASSES, matcher, {}, attribute_loss="focal")
    criterion = make_criterion(num_aux=0)
    generator = torch.Generator().manual_seed(1)
    outputs, _ = make_outputs(1, 2, 4, generator)
    with pytest.raises(ValueError, match="targets"):
        criterion(outputs, random_targets([1], generator))
    bad = dict(outputs, pred_logits=outputs["pred_logits"][..., :-1])
    with pytest.raises(ValueError, match="pred_logits"):
        criterion(bad, random_targets([1, 1], generator))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_integer_labels_of_any_width_give_the_int64_losses(dtype):
    generator = torch.Generator().manual_seed(17)
    targets = random_targets([3, 0, 5], generator)
    outputs, _ = make_outputs(2, 3, 6, generator)
    expected = make_criterion(num_aux=1)(outputs, targets)
    narrow = [dict(target, labels=target["labels"].to(dtype)) for target in targets]
    losses = make_criterion(num_aux=1)(outputs, narrow)
    assert losses.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=0, atol=0, msg=name)


def test_bad_labels_are_named():
    generator = torch.Generator().manual_seed(19)
    targets = random_targets([2, 3], generator)
    outputs, _ = make_outputs(1, 2, 4, generator)
    criterion = make_criterion(num_aux=0)
    for bad_dtype in (torch.float32, torch.float64, torch.bool):
        bad = [dict(target) for target in targets]
        bad[1]["labels"] = bad[1]["labels"].to(bad_dtype)
        with pytest.raises(TypeError, match=r"targets\[1\]\['labels'\]: expected an integer tensor"):
            criterion(outputs, bad)
    # The no-object index is not a target class either.
    for label in (NUM_CLASSES, NUM_CLASSES + 3, -1):
        bad = [dict(target) for target in targets]
        bad[1]["labels"] = bad[1]["labels"].clone()
        bad[1]["labels"][2] = label
        expected = rf"targets\[1\]\['labels'\]: expected class indices in \[0, {NUM_CLASSES}\).*got {label}"
        with pytest.raises(ValueError, match=expected):
            criterion(outputs, bad)


@pytest.mark.parametrize("backend", ["fastvlp", "scipy"])
def test_empty_batch_gives_zero_losses_that_backpropagate(backend):
    generator = torch.Generator().manual_seed(23)
    outputs, layers = make_outputs(3, 0, 6, generator)
    reference_outputs, _ = make_outputs(3, 2, 6, generator)
    criterion = make_criterion(backend, num_aux=2)
    losses = criterion(outputs, [])
    assert losses.keys() == criterion(reference_outputs, random_targets([1, 2], generator)).keys()
    for name, value in losses.items():
        assert value.shape == () and value.device == outputs["pred_logits"].device, name
        assert value.item() == (100.0 if name == "class_error" else 0.0), name
    criterion.weighted_total(losses).backward()
    for layer in layers:
        for tensor in layer.values():
            assert tensor.grad is None or tensor.grad.numel() == 0


def test_changing_eos_coef_takes_effect():
    generator = torch.Generator().manual_seed(29)
    targets = random_targets([2, 4], generator)
    outputs, layers = make_outputs(1, 2, 5, generator)
    criterion = make_criterion(num_aux=0)
    first = criterion(outputs, targets)["loss_ce"]
    torch.testing.assert_close(first, torch.as_tensor(reference_losses(layers, targets, "softmax")["loss_ce"]))
    for eos in (1.0, 0.37, 0.0):
        criterion.eos_coef = eos
        fresh = make_criterion(num_aux=0)
        fresh.eos_coef = eos
        assert criterion.empty_weight[-1].item() == pytest.approx(eos) and criterion.empty_weight[:-1].eq(1).all()
        changed = criterion(outputs, targets)["loss_ce"]
        torch.testing.assert_close(changed, fresh(outputs, targets)["loss_ce"], rtol=0, atol=0)
        # The same loss written out: cross-entropy weighted by class, with no-object weighted eos.
        logits = outputs["pred_logits"].detach()
        classes = torch.full(logits.shape[:2], NUM_CLASSES)
        for image, (rows, cols) in enumerate(criterion.matcher(outputs, targets)):
            classes[image, rows] = targets[image]["labels"][cols]
        weight = torch.ones(NUM_CLASSES + 1, dtype=torch.float64)
        weight[-1] = eos
        torch.testing.assert_close(changed.detach(), F.cross_entropy(logits.transpose(1, 2), classes, weight))
    assert changed.item() != pytest.approx(first.item())
    with pytest.raises(ValueError, match="eos_coef: expected a non-negative finite weight"):
        criterion.eos_coef = -0.1


def test_empty_weight_is_a_buffer_outside_the_state_dict():
    criterion = make_criterion(num_aux=0)
    assert dict(criterion.named_buffers())["empty_weight"].shape == (NUM_CLASSES + 1,)
    assert criterion.empty_weight[-1].item() == pytest.approx(EOS)
    # Model checkpoints saved before the buffer existed keep loading strictly.
    assert "empty_weight" not in criterion.state_dict()
    criterion.load_state_dict({}, strict=True)


def test_targets_are_moved_to_the_predictions_device_once():
    """Matches come back on the predictions' device; every target tensor the losses index is moved
    there first (checked here with the meta device, which needs no GPU)."""
    generator = torch.Generator().manual_seed(37)
    targets = random_targets([2, 0, 3], generator)
    targets[0]["labels"] = targets[0]["labels"].to(torch.int32)
    moved = SetCriterion._targets_on(targets, torch.device("meta"))
    for original, target in zip(targets, moved):
        assert target["labels"].device.type == "meta" and target["labels"].dtype == torch.int64
        assert target["boxes"].device.type == "meta"
        assert ("attributes" in target) == ("attributes" in original)
        if "attributes" in target:
            assert target["attributes"].device.type == "meta"
    assert targets[0]["labels"].device.type == "cpu"  # the caller's dicts are left alone


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fastvlp", "scipy"])
def test_cpu_targets_with_cuda_predictions(backend):
    generator = torch.Generator().manual_seed(41)
    targets = random_targets([3, 0, 5], generator)
    outputs, _ = make_outputs(2, 3, 6, generator)
    expected = make_criterion(backend, num_aux=1)(outputs, targets)
    on_cuda = {key: value.detach().cuda() for key, value in outputs.items() if key != "aux_outputs"}
    on_cuda["aux_outputs"] = [{key: value.detach().cuda() for key, value in layer.items()}
                              for layer in outputs["aux_outputs"]]
    losses = make_criterion(backend, num_aux=1)(on_cuda, targets)
    for name in expected:
        assert losses[name].device.type == "cuda"
        # The float32 logging values (cardinality_error) may differ in the last bit: CUDA's mean multiplies
        # by 1/n where the CPU divides by n.
        tight = expected[name].dtype == torch.float64
        torch.testing.assert_close(losses[name].cpu(), expected[name].detach(), rtol=1e-9 if tight else 1.3e-6,
                                   atol=1e-12 if tight else 1e-5, msg=name)


def test_non_finite_predicted_boxes_give_non_finite_box_losses_not_errors():
    generator = torch.Generator().manual_seed(43)
    targets = random_targets([3, 4], generator)
    outputs, _ = make_outputs(1, 2, 6, generator)
    with torch.no_grad():
        outputs["pred_boxes"][1, 2, 0] = float("nan")
    matcher = HungarianMatcher(*COSTS, check_finite=False)
    criterion = SetCriterion(NUM_CLASSES, matcher, build_weight_dict(), EOS, ("labels", "boxes"))
    losses = criterion(outputs, targets)
    assert torch.isnan(losses["loss_bbox"]) and torch.isnan(losses["loss_giou"])
    assert torch.isfinite(losses["loss_ce"])
