"""Anchor-box detection queries (DAB-DETR): the boxes' sine encoding, the first predictions at the anchors,
the layer-by-layer refinement, and the model's keys with and without them."""
import pytest
import torch
from train_helpers import SMALL_MODEL

from fastvlp.models.anchor_queries import AnchorQueries, sine_encode_boxes
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.heads import DetectionHeads
from fastvlp.models.presets import get_preset
from fastvlp.nn.position_encoding import PositionEmbeddingSine


def anchored_model(**changes):
    torch.manual_seed(0)
    return E2EVLP(get_preset("tiny", **{**SMALL_MODEL, "anchor_queries": True, "num_queries": 6, "num_decoder_layers": 2,
                                            **changes})).eval()


def encoded(model, seed=1):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 70, 100)
    mask = torch.zeros(2, 70, 100, dtype=torch.bool)
    mask[1, :, 72:] = True
    with torch.no_grad():  # the tests differentiate the decoder only
        return model.encode_image_only(images, mask)


def test_box_centres_are_encoded_as_the_image_tokens_positions():
    feats = 16
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    grid = PositionEmbeddingSine(feats, normalize=True)(mask)[0]  # [2F, 3, 5]
    for row, col in ((0, 0), (2, 4), (1, 3)):
        # the sine encoding of a cell is that of its (1-based) index over the extent, times 2 pi
        box = torch.tensor([(col + 1) / 5, (row + 1) / 3, 0.3, 0.6], dtype=torch.float64)
        encoding = sine_encode_boxes(box, feats)
        assert encoding.shape == (4 * feats,)
        torch.testing.assert_close(encoding[: 2 * feats], grid[:, row, col], rtol=1e-5, atol=1e-5)
    # width and height get the same code as a position of that value
    box = torch.tensor([[0.1, 0.2, 0.7, 0.4]])
    encoding = sine_encode_boxes(box, feats)[0]
    swapped = sine_encode_boxes(torch.tensor([[0.4, 0.7, 0.0, 0.0]]), feats)[0]
    torch.testing.assert_close(encoding[2 * feats:], swapped[: 2 * feats])
    with pytest.raises(ValueError, match="boxes"):
        sine_encode_boxes(torch.zeros(3, 2), feats)


def test_anchors_start_spread_over_the_image_at_a_fifth_of_its_size():
    torch.manual_seed(0)
    queries = AnchorQueries(50, 32)
    boxes = queries.boxes()
    assert boxes.shape == (50, 4)
    assert ((boxes[:, :2] >= 0.05 - 1e-6) & (boxes[:, :2] <= 0.95 + 1e-6)).all()
    assert boxes[:, :2].std(0).min() > 0.15  # spread, not all at one place
    torch.testing.assert_close(boxes[:, 2:], torch.full((50, 2), 0.2))
    assert queries.positional_query(boxes).shape == (50, 32)
    with pytest.raises(ValueError, match="num_queries"):
        AnchorQueries(0, 32)
    with pytest.raises(ValueError, match="d_model"):
        AnchorQueries(4, 31)


def test_every_layer_first_predicts_its_reference_and_refines_the_one_before():
    model = anchored_model()
    memory = encoded(model)
    anchors = model.query_anchors.boxes().detach()
    with torch.no_grad():
        output = model.detect(memory, aux_outputs=True)
    # the box MLP starts at zero, so every layer passes its reference on unchanged
    assert len(output.aux_outputs) == model.config.num_decoder_layers - 1
    for boxes in (output.aux_outputs[0]["pred_boxes"], output.pred_boxes):
        torch.testing.assert_close(boxes, anchors.expand(2, -1, -1), rtol=1e-5, atol=1e-6)
    # a constant offset b in logit space: layer l predicts sigmoid(logit(anchor) + l * b)
    offset = torch.tensor([0.3, -0.2, 0.1, 0.4])
    with torch.no_grad():
        model.detection_heads.bbox_embed.layers[-1].bias.copy_(offset)
        output = model.detect(memory, aux_outputs=True)
    logits = torch.logit(anchors.double())
    torch.testing.assert_close(output.aux_outputs[0]["pred_boxes"].double(), (logits + offset).sigmoid().expand(2, -1, -1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.pred_boxes.double(), (logits + 2 * offset).sigmoid().expand(2, -1, -1),
                               rtol=1e-5, atol=1e-6)


def test_positional_queries_follow_the_boxes_and_reach_the_class_logits():
    model = anchored_model()
    memory = encoded(model)
    with torch.no_grad():
        first = model.detect(memory).pred_logits
        model.query_anchors.anchors.weight.add_(0.5)
        moved = model.detect(memory).pred_logits
    assert not torch.allclose(first, moved)


def test_anchors_train_and_the_boxes_passed_on_are_detached():
    model = anchored_model().train()
    memory = encoded(model)
    output = model.detect(memory, aux_outputs=True)
    # the first layer's boxes are sigmoid(MLP + logit(anchor)): every anchor gets a gradient
    output.aux_outputs[0]["pred_boxes"].sum().backward()
    assert (model.query_anchors.anchors.weight.grad.abs().sum(1) > 0).all()
    # the last layer's boxes are offsets from the first layer's, detached: with the box MLP at zero they
    # reach nothing, neither the anchors nor the MLP's hidden layers
    model.zero_grad()
    model.detect(memory, aux_outputs=True).pred_boxes.sum().backward()
    assert model.query_anchors.anchors.weight.grad is None or not model.query_anchors.anchors.weight.grad.any()


def test_state_dict_keys_with_and_without_anchors():
    plain = E2EVLP(get_preset("tiny", **{**SMALL_MODEL, "num_decoder_layers": 2})).state_dict()
    anchored = anchored_model().state_dict()
    assert "query_embed.weight" in plain and not any(k.startswith("query_anchors.") for k in plain)
    assert "query_embed.weight" not in anchored and "query_anchors.anchors.weight" in anchored
    assert set(plain) - {"query_embed.weight"} == {k for k in anchored if not k.startswith("query_anchors.")}


def test_anchor_queries_must_be_a_bool():
    with pytest.raises(TypeError, match="anchor_queries"):
        E2EVLPConfig(anchor_queries=1)


def test_heads_without_reference_predict_absolute_boxes():
    torch.manual_seed(0)
    heads = DetectionHeads(16, 3)
    hidden = torch.randn(2, 5, 16)
    torch.testing.assert_close(heads(hidden)["pred_boxes"], heads.bbox_embed(hidden).sigmoid())
    reference = torch.rand(2, 5, 4) * 0.8 + 0.1
    heads.start_boxes_at_reference()
    torch.testing.assert_close(heads(hidden, reference=reference)["pred_boxes"], reference, rtol=1e-5, atol=1e-6)
