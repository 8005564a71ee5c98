"""E2EVLPConfig validation and JSON round trip; presets and their parameter counts."""
import json

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from fastvlp.models import E2EVLP, E2EVLPConfig, count_parameters, get_preset, list_presets, preset_parameter_counts
from fastvlp.models.presets import PAPER_PARAMETER_COUNTS, finetune_lr_drops, finetune_overrides

PAPER_PRESETS = [f"e2e-vlp-{layers}-r{depth}" for layers in (6, 12) for depth in (50, 101, 152)]


def test_head_count_must_divide_d_model():
    with pytest.raises(ValueError, match=r"num_heads=12 does not divide d_model=256"):
        E2EVLPConfig(num_heads=12)
    assert E2EVLPConfig(num_heads=8).head_dim == 32


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attention_backend": "flash"}, "attention_backend"),
        ({"matcher_backend": "lapjv"}, "matcher_backend"),
        ({"backbone": "resnet200"}, "backbone"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_queries": 0}, "num_queries"),
        ({"attribute_loss": "focal"}, "attribute_loss"),
        ({"backbone_frozen_stages": 5}, "backbone_frozen_stages"),
        ({"no_object_weight": -0.1}, "no_object_weight"),
        ({"pad_token_id": 30522}, "pad_token_id"),
        ({"contrastive_loss_weight": -1.0}, "contrastive_loss_weight"),
        ({"contrastive_dim": 0}, "contrastive_dim"),
    ],
)
def test_rejects_invalid_values(changes, message):
    with pytest.raises(ValueError, match=message):
        E2EVLPConfig(**changes)


def test_rejects_wrong_types():
    with pytest.raises(TypeError, match="d_model"):
        E2EVLPConfig(d_model=256.0)
    with pytest.raises(TypeError, match="num_heads"):
        E2EVLPConfig(num_heads=True)


def test_json_round_trip():
    config = E2EVLPConfig(num_encoder_layers=12, attention_backend="torch", lr_backbone=3e-5)
    text = config.to_json()
    assert json.loads(text)["num_encoder_layers"] == 12
    assert E2EVLPConfig.from_json(text) == config
    assert E2EVLPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="num_layer"):
        E2EVLPConfig.from_dict({"num_layer": 3})
    assert config.replace(num_heads=4).num_heads == 4


def test_presets():
    assert list_presets() == PAPER_PRESETS + ["tiny"]
    for name in PAPER_PRESETS:
        config = get_preset(name)
        layers, depth = name.split("-")[2:]
        assert config.num_encoder_layers == int(layers) and config.backbone == f"resnet{depth[1:]}"
        assert (config.d_model, config.ffn_dim, config.num_heads, config.num_decoder_layers) == (256, 1024, 8, 6)
        assert config.frozen_batch_norm and config.num_queries == 100
        assert (config.lr, config.lr_backbone, config.weight_decay) == (1e-4, 1e-5, 1e-4)
    tiny = get_preset("tiny", vocab_size=500)
    assert tiny.backbone == "resnet10" and not tiny.frozen_batch_norm and tiny.vocab_size == 500 and tiny.dropout == 0.0
    assert tiny.lr_backbone == tiny.lr
    with pytest.raises(ValueError, match="name"):
        get_preset("e2e-vlp-24-r50")


def test_finetune_overrides_only_tiny_detection_and_retrieval():
    tiny_detection = finetune_overrides("tiny", "detection")
    assert tiny_detection == {"num_queries": 10, "match_cost_class": 2.0, "class_loss_weight": 2.0, "backbone_output": "dc5",
                              "anchor_queries": True, "token_detection_loss_weight": 1.0, "two_stage": True}
    get_preset("tiny", **tiny_detection)  # valid fields and values
    tiny_detection["num_queries"] = 3
    assert finetune_overrides("tiny", "detection")["num_queries"] == 10  # a copy each time
    tiny_retrieval = finetune_overrides("tiny", "retrieval")
    assert tiny_retrieval == {"contrastive_loss_weight": 1.0, "contrastive_dim": 64}
    get_preset("tiny", **tiny_retrieval)
    for preset in PAPER_PRESETS + [None, "unknown"]:
        for task in ("detection", "retrieval"):
            assert finetune_overrides(preset, task) == {}
    for task in ("vqa", "nlvr2", "caption"):
        assert finetune_overrides("tiny", task) == {}


def test_finetune_lr_drops_only_tiny_detection():
    assert finetune_lr_drops("tiny", "detection") == (0.9,)
    for preset in PAPER_PRESETS + [None, "unknown"]:
        assert finetune_lr_drops(preset, "detection") is None
    for task in ("vqa", "nlvr2", "caption", "retrieval"):
        assert finetune_lr_drops("tiny", task) is None


def expected_count(config):
    """Parameter count assembled from its parts' formulas (torchvision's ResNet counted separately)."""
    with torch.device("meta"):
        norm = FrozenBatchNorm2d if config.frozen_batch_norm else torch.nn.BatchNorm2d
        if config.backbone == "resnet10":
            resnet = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)
        else:
            resnet = getattr(torchvision.models, config.backbone)(weights=None, norm_layer=norm)
    d, f, v = config.d_model, config.ffn_dim, config.vocab_size
    body = sum(p.numel() for name, p in resnet.named_parameters() if not name.startswith("fc."))
    backbone = body + resnet.fc.in_features * d + d
    attention = 4 * d * d + 4 * d
    encoder_layer = attention + 2 * d * f + f + d + 2 * 2 * d
    decoder_layer = 2 * attention + 2 * d * f + f + d + 3 * 2 * d
    embeddings = (v + config.max_text_len + config.type_vocab_size) * d + 2 * d
    token_head = d * d + d + 2 * d + v  # dense, LayerNorm, bias (the projection is the tied embedding)
    detection = d * (config.num_classes + 1) + config.num_classes + 1 + d * config.num_attributes + config.num_attributes
    detection += 2 * (d * d + d) + 4 * d + 4
    return (
        backbone + embeddings + config.num_encoder_layers * encoder_layer + config.num_decoder_layers * decoder_layer
        + 2 * d + config.num_queries * d + 2 * token_head + (d * d + d + 2 * d + 2) + detection
    )


def test_parameter_counts_follow_the_architecture():
    counts = preset_parameter_counts()
    assert set(counts) == set(PAPER_PARAMETER_COUNTS) | {"tiny"}
    for name, parts in counts.items():
        assert parts["total"] == expected_count(get_preset(name)), name
        assert parts["total"] == sum(value for key, value in parts.items() if key != "total")
    # BERT's 30522 x 256 word embeddings are part of the count.
    assert counts["e2e-vlp-6-r50"]["text_embeddings"] == (30522 + 40 + 2) * 256 + 2 * 256
    # Deeper backbones and encoders add what the paper's Table 5 says they add, to within a million.
    for shallow, deep in (("e2e-vlp-6-r50", "e2e-vlp-6-r101"), ("e2e-vlp-6-r101", "e2e-vlp-6-r152")):
        paper_step = PAPER_PARAMETER_COUNTS[deep] - PAPER_PARAMETER_COUNTS[shallow]
        assert abs(counts[deep]["total"] - counts[shallow]["total"] - paper_step) < 1_000_000


def test_meta_count_equals_a_real_model():
    config = get_preset("tiny", vocab_size=300, num_classes=7, num_attributes=3)
    model = E2EVLP(config)
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())
