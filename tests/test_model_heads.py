"""Output heads against their formulas in float64; tied weights; DETR's per-layer output layout."""
import pytest
import torch
import torch.nn.functional as F

from fastvlp.models.heads import MLP, DetectionHeads, ImageTextMatchingHead, TokenPredictionHead, split_decoder_layers


def double(parameter):
    return parameter.detach().double()


def test_token_prediction_head_is_tied_and_matches_formula():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 8)
    head = TokenPredictionHead(8, embedding)
    with torch.no_grad():
        head.bias.normal_()
    assert head.decoder.weight is embedding.weight
    hidden = torch.randn(2, 5, 8)
    x = F.gelu(hidden.double() @ double(head.dense.weight).T + double(head.dense.bias))
    x = F.layer_norm(x, (8,), double(head.layer_norm.weight), double(head.layer_norm.bias), head.layer_norm.eps)
    expected = x @ double(embedding.weight).T + double(head.bias)
    torch.testing.assert_close(head(hidden).double(), expected, rtol=1e-5, atol=1e-5)
    head(hidden).sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="word_embeddings"):
        TokenPredictionHead(4, embedding)


def test_image_text_matching_head():
    torch.manual_seed(1)
    head = ImageTextMatchingHead(8)
    cls = torch.randn(3, 8)
    pooled = torch.tanh(cls.double() @ double(head.pooler.weight).T + double(head.pooler.bias))
    expected = pooled @ double(head.classifier.weight).T + double(head.classifier.bias)
    torch.testing.assert_close(head(cls).double(), expected, rtol=1e-5, atol=1e-6)


def test_detection_heads_and_layer_split():
    torch.manual_seed(2)
    heads = DetectionHeads(8, num_classes=5, num_attributes=3)
    hidden = torch.randn(4, 2, 6, 8)  # [layers, B, Q, d]
    outputs = heads(hidden)
    assert outputs["pred_logits"].shape == (4, 2, 6, 6) and outputs["pred_attributes"].shape == (4, 2, 6, 3)
    x = hidden.double()
    for index, layer in enumerate(heads.bbox_embed.layers):
        x = x @ double(layer.weight).T + double(layer.bias)
        if index < 2:
            x = x.clamp(min=0)
    torch.testing.assert_close(outputs["pred_boxes"].double(), x.sigmoid(), rtol=1e-5, atol=1e-6)
    split = split_decoder_layers(outputs)
    assert torch.equal(split["pred_boxes"], outputs["pred_boxes"][-1])
    assert len(split["aux_outputs"]) == 3
    assert torch.equal(split["aux_outputs"][1]["pred_logits"], outputs["pred_logits"][1])
    assert "pred_attributes" not in DetectionHeads(8, 5)(hidden)


def test_mlp_layers():
    mlp = MLP(4, 16, 2, 3)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(16, 4), (16, 16), (2, 16)]
    with pytest.raises(ValueError, match="num_layers"):
        MLP(4, 4, 4, 0)
    with pytest.raises(ValueError, match="num_classes"):
        DetectionHeads(8, 0)
