"""The one-to-many token detection head: token centres, the FCOS-style assignment with the nearest token
for every object, the losses against a float64 reference, and its place in the model and the tasks."""
import math

import pytest
import torch
from test_model_e2e_vlp import NUM_CLASSES, small_config, synthetic_batch

from fastvlp.models import E2EVLP
from fastvlp.models.token_detection import (CLASS_WEIGHT, GIOU_WEIGHT, L1_WEIGHT, TokenDetectionHead, assign_tokens,
                                            per_image_targets, token_centres, token_detection_losses)
from fastvlp.nn.matched_pairs import PaddedTargets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_centres_span_each_images_own_extent():
    padding = torch.zeros(2, 3, 4, dtype=torch.bool)
    padding[1, :, 2:] = True  # image 1 is 2 tokens wide
    padding[1, 2:, :] = True  # and 2 high
    centres = token_centres(padding)
    assert centres.shape == (2, 3, 4, 2)
    torch.testing.assert_close(centres[0, 0, :, 0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(centres[0, :, 0, 1], torch.tensor([1 / 6, 0.5, 5 / 6]))
    torch.testing.assert_close(centres[1, 0, :2, 0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(centres[1, :2, 0, 1], torch.tensor([0.25, 0.75]))
    assert (centres[1, 0, 2:, 0] > 1).all() and (centres[1, 2, :, 1] > 1).all()  # padding lies outside


def test_assignment_takes_the_smallest_box_and_gives_every_object_its_nearest_token():
    grid = torch.tensor([[x, y] for y in (0.125, 0.375, 0.625, 0.875) for x in (0.125, 0.375, 0.625, 0.875)])
    valid = torch.ones(16, dtype=torch.bool)
    boxes = torch.tensor([
        [0.5, 0.5, 0.9, 0.9],    # large: holds every centre
        [0.25, 0.25, 0.4, 0.4],  # holds tokens (0,0), (1,0), (0,1), (1,1)
        [0.8, 0.8, 0.05, 0.05],  # smaller than a token: holds no centre
    ])
    assigned = assign_tokens(grid, valid, boxes)
    expected = torch.zeros(16, dtype=torch.int64)
    expected[[0, 1, 4, 5]] = 1
    expected[15] = 2  # (0.875, 0.875) is the tiny box's nearest token
    assert assigned.tolist() == expected.tolist()
    # a padded token is never assigned, even as an object's nearest
    valid[15] = False
    assigned = assign_tokens(grid, valid, boxes)
    assert assigned[15] == -1 and assigned[11] == 2  # (0.875, 0.625) is a nearest valid token (first of two)
    assert (assign_tokens(grid, valid, torch.zeros(0, 4)) == -1).all()
    assert (assign_tokens(grid, torch.zeros(16, dtype=torch.bool), boxes) == -1).all()


def reference_losses(logits, boxes, centres, valid, targets):
    """The losses in float64 with plain formulas: focal, L1 and GIoU written out."""
    logits, boxes = logits.double(), boxes.double()
    focal_sum, l1_sum, giou_sum, positives = 0.0, 0.0, 0.0, 0
    for row, target in enumerate(targets):
        assigned = assign_tokens(centres[row], valid[row], target["boxes"])
        for token in range(logits.shape[1]):
            if not valid[row, token]:
                continue
            for cls in range(logits.shape[2]):
                y = 1.0 if assigned[token] >= 0 and target["labels"][assigned[token]] == cls else 0.0
                p = torch.sigmoid(logits[row, token, cls])
                p_t = p * y + (1 - p) * (1 - y)
                alpha = 0.25 * y + 0.75 * (1 - y)
                focal_sum += float(-alpha * (1 - p_t) ** 2 * torch.log(p_t))
            if assigned[token] >= 0:
                positives += 1
                pred, true = boxes[row, token], target["boxes"][assigned[token]].double()
                l1_sum += float((pred - true).abs().sum())
                a = torch.cat((pred[:2] - pred[2:] / 2, pred[:2] + pred[2:] / 2))
                b = torch.cat((true[:2] - true[2:] / 2, true[:2] + true[2:] / 2))
                inter = (torch.min(a[2:], b[2:]) - torch.max(a[:2], b[:2])).clamp(min=0).prod()
                union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
                hull = (torch.max(a[2:], b[2:]) - torch.min(a[:2], b[:2])).prod()
                giou_sum += float(1 - (inter / union - (hull - union) / hull))
    n = max(positives, 1)
    return focal_sum / n, l1_sum / n, giou_sum / n


def test_losses_match_a_float64_reference_and_ignore_padding():
    generator = torch.Generator().manual_seed(3)
    padding = torch.zeros(2, 3, 5, dtype=torch.bool)
    padding[1, :, 3:] = True
    centres = token_centres(padding).flatten(1, 2)
    valid = ~padding.flatten(1)
    logits = torch.randn(2, 15, 3, generator=generator)
    boxes = torch.cat((torch.rand(2, 15, 2, generator=generator) * 0.6 + 0.2,
                       torch.rand(2, 15, 2, generator=generator) * 0.3 + 0.05), -1)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.5, 0.6], [0.7, 0.5, 0.1, 0.1]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.9]])}]
    losses = token_detection_losses(logits, boxes, centres, valid, targets)
    focal, l1, giou = reference_losses(logits, boxes, centres, valid, targets)
    assert math.isclose(float(losses["loss_token_ce"]), focal, rel_tol=1e-5)
    assert math.isclose(float(losses["loss_token_bbox"]), l1, rel_tol=1e-5)
    assert math.isclose(float(losses["loss_token_giou"]), giou, rel_tol=1e-5)
    assert math.isclose(float(losses["loss_token"]), CLASS_WEIGHT * focal + L1_WEIGHT * l1 + GIOU_WEIGHT * giou,
                        rel_tol=1e-5)
    # what the padded tokens predict changes nothing
    logits[1, ~valid[1]] = 50.0
    boxes[1, ~valid[1]] = 0.9
    again = token_detection_losses(logits, boxes, centres, valid, targets)
    torch.testing.assert_close(again["loss_token"], losses["loss_token"])
    # no objects at all: only the background term, still differentiable
    logits.requires_grad_(True)
    empty = token_detection_losses(logits, boxes, centres, valid, [{"labels": torch.zeros(0, dtype=torch.int64),
                                                                    "boxes": torch.zeros(0, 4)}] * 2)
    assert float(empty["loss_token_bbox"]) == 0.0 and float(empty["loss_token_giou"]) == 0.0
    empty["loss_token"].backward()
    assert logits.grad[valid].abs().sum() > 0 and logits.grad[~valid].abs().sum() == 0
    with pytest.raises(ValueError, match="targets"):
        token_detection_losses(logits, boxes, centres, valid, targets[:1])


def test_head_starts_at_its_reference_boxes_and_padded_targets_unpad():
    torch.manual_seed(0)
    head = TokenDetectionHead(16, 4)
    padding = torch.zeros(1, 2, 4, dtype=torch.bool)
    centres = token_centres(padding).flatten(1, 2)
    out = head(torch.randn(1, 8, 16), centres, (2, 4))
    assert out["logits"].shape == (1, 8, 4)
    torch.testing.assert_close(out["boxes"][..., :2], centres)
    torch.testing.assert_close(out["boxes"][..., 2:], torch.tensor([0.5, 0.5]).expand(1, 8, 2))
    torch.testing.assert_close(out["logits"].sigmoid(), torch.full_like(out["logits"], 0.01), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="num_classes"):
        TokenDetectionHead(16, 0)
    padded = PaddedTargets(labels=torch.tensor([[1, 2], [3, 0]]), boxes=torch.rand(2, 2, 4), counts=torch.tensor([2, 1]))
    unpadded = per_image_targets(padded)
    assert [t["labels"].tolist() for t in unpadded] == [[1, 2], [3]]
    torch.testing.assert_close(unpadded[1]["boxes"], padded.boxes[1, :1])


def test_pretraining_adds_the_weighted_token_loss_to_the_detection_loss():
    batch = synthetic_batch()
    torch.manual_seed(0)
    with_head = E2EVLP(small_config(token_detection_loss_weight=0.5)).train()
    torch.manual_seed(0)
    without = E2EVLP(small_config()).train()
    without.load_state_dict({k: v for k, v in with_head.state_dict().items() if not k.startswith("token_detection_head.")})
    out, plain = with_head(batch), without(batch)
    torch.testing.assert_close(out.losses["loss_det"], plain.losses["loss_det"] + 0.5 * out.losses["loss_token"])
    out.losses["loss_token"].backward()  # the token loss alone reaches the head, the encoder and the backbone
    for module in (with_head.token_detection_head, with_head.encoder, with_head.backbone):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0
    assert with_head.token_detection_head.num_classes == NUM_CLASSES
    assert not any(k.startswith("token_detection_head.") for k in without.state_dict())
    with_head.replace_detection_heads(num_classes=3)
    assert with_head.token_detection_head.num_classes == 3
    with pytest.raises(ValueError, match="token_detection_loss_weight"):
        without.token_detection_losses(None, [])


def two_stage_model(**changes):
    torch.manual_seed(0)
    config = small_config(anchor_queries=True, token_detection_loss_weight=1.0, two_stage=True, **changes)
    return E2EVLP(config).double().eval()


def image_encoding(model, height, width, seed=2):
    generator = torch.Generator().manual_seed(seed)
    from fastvlp.models.outputs import EncoderOutput

    padding = torch.zeros(2, height * width, dtype=torch.bool)
    padding[1, -width:] = True  # image 1's last row is padding
    d = model.config.d_model
    return EncoderOutput(memory=torch.randn(2, height * width, d, generator=generator, dtype=torch.float64),
                         padding_mask=padding, pos=torch.randn(2, height * width, d, generator=generator, dtype=torch.float64),
                         text_length=0, spatial_shape=(height, width))


def test_two_stage_queries_start_at_the_best_scored_token_boxes():
    model = two_stage_model()
    encoded = image_encoding(model, 3, 4)
    with torch.no_grad():  # scores that differ from token to token, boxes that differ from the references
        model.token_detection_head.class_embed.weight.normal_()
        model.token_detection_head.box_embed.layers[-1].weight.normal_(std=0.5)
    predicted, padding = model._token_predictions(encoded)
    scores = predicted["logits"].amax(-1).masked_fill(padding, float("-inf"))
    queries = model.config.num_queries  # 6 of 12 tokens (8 valid in image 1)
    expected = torch.stack([predicted["boxes"][row, scores[row].argsort(descending=True)[:queries]] for row in range(2)])
    proposals = model._token_proposals(encoded, model.query_anchors.boxes())
    torch.testing.assert_close(proposals, expected)
    assert not proposals.requires_grad
    assert not bool(padding[1, scores[1].argsort(descending=True)[:queries]].any())
    # the first decoder layer's box MLP starts at zero: its boxes are the proposals
    output = model.detect(encoded)
    torch.testing.assert_close(output.aux_outputs[0]["pred_boxes"], proposals.double(), rtol=1e-6, atol=1e-6)


def test_two_stage_fills_missing_tokens_with_the_learned_anchors():
    model = two_stage_model()
    encoded = image_encoding(model, 1, 4)  # 4 tokens for 6 queries
    anchors = model.query_anchors.boxes()
    proposals = model._token_proposals(encoded, anchors)
    assert proposals.shape == (2, 6, 4)
    torch.testing.assert_close(proposals[:, 4:], anchors[None, 4:].expand(2, -1, -1).to(proposals))


def test_two_stage_needs_anchors_a_token_head_and_one_group():
    for changes in (dict(anchor_queries=False), dict(token_detection_loss_weight=0.0), dict(query_groups=2)):
        values = {**dict(anchor_queries=True, token_detection_loss_weight=1.0, two_stage=True), **changes}
        with pytest.raises(ValueError, match="two_stage"):
            small_config(**values)
    with pytest.raises(TypeError, match="two_stage"):
        small_config(two_stage=1)
