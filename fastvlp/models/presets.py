"""Named configurations: the six of the paper's Table 5 and ``tiny`` for CPU tests and the demo."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from fastvlp.models.config import E2EVLPConfig


def _paper(num_encoder_layers: int, backbone: str) -> E2EVLPConfig:
    # d 256, FFN 1024, 6 decoder layers, frozen batch norm (paper, 4.2); 8 heads because the paper's 12
    # does not divide 256.
    return E2EVLPConfig(backbone=backbone, num_encoder_layers=num_encoder_layers)


# Nothing downloads, so `tiny` starts from random weights: trainable batch norm, the whole backbone trained
# at the Transformer's learning rate. On a CPU the backbone dominates a step's time, so it is ResNet-10
# (torchvision's ResNet with one basic block a stage: half of ResNet-18's time), and the Transformer keeps
# d = 128 and head_dim 32. No dropout: the short CPU runs it is for do not overfit, and on the CPU the
# attention's dropout mask (the kernels' Philox stream, replayed in torch) costs a fifth of a step.
_TINY = dict(
    backbone="resnet10",
    frozen_batch_norm=False,
    dropout=0.0,
    backbone_frozen_stages=0,
    d_model=128,
    num_heads=4,
    ffn_dim=512,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_queries=20,
    # From random weights a short CPU run needs a larger step than the paper's fine-tuned-from-ImageNet
    # rates: at 5e-4 the demo's MLM, detection and caption losses fall by a quarter to a half in 300 steps.
    lr=5e-4,
    lr_backbone=5e-4,
)

PRESETS: Dict[str, Dict[str, Any]] = {
    **{
        f"e2e-vlp-{layers}-r{depth}": dict(backbone=f"resnet{depth}", num_encoder_layers=layers)
        for layers in (6, 12)
        for depth in (50, 101, 152)
    },
    "tiny": _TINY,
}

# Fine-tuning changes that a preset makes for one task, before `--set`. The tiny detector: the synthetic scenes
# hold at most 8 objects, and from a 200-step pre-training DETR's class loss stayed at the class prior's
# entropy through all 800 fine-tuning steps with 20 queries and the class weighted 1 in matching and loss.
# With 10 queries (a larger share of them matched in every image) and the class weighted 2 in both, it left
# the prior within the run (AP50 0.075 and 0.035 with two seeds, against 0.001 and 0.004); either change alone
# gave AP50 0.015 and 0.008. The pre-trained query embeddings (20) do not fit the 10 and start anew. Then the
# boxes held AP50 back: at tiny's scale an object is about half a stride-32 token. DETR's DC5 (the last stage
# at stride 16 by dilation, every pre-trained weight kept) gave AP50 0.092, 0.054 and 0.137 against 0.030,
# 0.032 and 0.010 on C5 from a later pre-training, for 0.8 s a step against 0.55. Group DETR's four query
# groups (four times the matched queries a step; inference keeps the first group) with the later rate drop
# below gave AP50 0.479, 0.407 and 0.527 over three seeds against 0.261, 0.212 and 0.278 with one, at no
# measurable cost a step. Two-stage queries did better still: a one-to-many head on the image tokens (weight
# 1), whose best-scored token boxes are the anchor boxes the decoder's queries start from, gave AP50
# 0.582, 0.586 and 0.558, and AP75 0.474, 0.464 and 0.449 where the groups' was at most 0.035. The tiny
# retriever: from random weights its [CLS] score did not learn to compare text with image in 400 steps (the
# circle loss stayed at its no-information value; txt_r5 and img_r5 at chance, 0.05). ALBEF's contrastive
# loss on text-only and image-only passes (weight 1, a 64-d space) aligns the two sides first, and the [CLS]
# score then learns from them. (docs/learning.md has the runs.)
FINETUNE_OVERRIDES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "tiny": {"detection": dict(num_queries=10, match_cost_class=2.0, class_loss_weight=2.0, backbone_output="dc5",
                               anchor_queries=True, token_detection_loss_weight=1.0, two_stage=True),
             "retrieval": dict(contrastive_loss_weight=1.0, contrastive_dim=64)},
}

# Where a preset's fine-tuning lowers the rate tenfold, as fractions of the run, in place of the task's
# own milestones. The tiny detector: DETR's 2/3 is for schedules of hundreds of epochs; in 800 steps the
# class and box losses sit on a plateau for the first 300 to 400 and had fallen for only about 150 steps
# at the full rate when it dropped. Late drops are what DETR's short schedules use too (DINO's 12
# epochs drop after 11). With one query group, dropping at 0.9 gave AP50 0.261, 0.212 and 0.278 over three
# seeds where 2/3 gave 0.092, 0.054 and 0.137 (docs/learning.md).
FINETUNE_LR_DROPS: Dict[str, Dict[str, Tuple[float, ...]]] = {
    "tiny": {"detection": (0.9,)},
}

# Table 5 of the paper, for comparison with `preset_parameter_counts`.
PAPER_PARAMETER_COUNTS = {
    "e2e-vlp-6-r50": 49_000_000,
    "e2e-vlp-6-r101": 68_000_000,
    "e2e-vlp-6-r152": 84_000_000,
    "e2e-vlp-12-r50": 59_000_000,
    "e2e-vlp-12-r101": 78_000_000,
    "e2e-vlp-12-r152": 94_000_000,
}


def list_presets() -> List[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> E2EVLPConfig:
    """The named preset with ``overrides`` applied (e.g. ``vocab_size`` from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"name: expected one of {list(PRESETS)}, got {name!r}")
    return E2EVLPConfig(**{**PRESETS[name], **overrides})


def finetune_overrides(preset: str | None, task: str) -> Dict[str, Any]:
    """The configuration fields that fine-tuning ``task`` from ``preset`` changes (empty for most pairs, and
    for a model of unknown preset)."""
    return dict(FINETUNE_OVERRIDES.get(preset, {}).get(task, {}))


def finetune_lr_drops(preset: str | None, task: str) -> Optional[Tuple[float, ...]]:
    """The fractions of a fine-tuning run of ``task`` from ``preset`` after which the rate drops tenfold,
    where the preset sets them (:data:`FINETUNE_LR_DROPS`); None where the task's own apply."""
    return FINETUNE_LR_DROPS.get(preset, {}).get(task)


def count_parameters(config: E2EVLPConfig) -> Dict[str, int]:
    """Parameter counts of the model ``config`` describes, by part and in total, without allocating it
    (the model is built on the meta device). Tied weights count once, parameters frozen by
    ``backbone_frozen_stages`` count; ``FrozenBatchNorm2d``'s scale and shift are buffers, not parameters,
    and do not (53k for a ResNet-50)."""
    import torch

    from fastvlp.models.e2e_vlp import E2EVLP

    if not isinstance(config, E2EVLPConfig):
        raise TypeError(f"config: expected an E2EVLPConfig, got {type(config).__name__}")
    with torch.device("meta"):
        model = E2EVLP(config)
    counts: Dict[str, int] = {}
    seen = set()
    for name, parameter in model.named_parameters():  # named_parameters skips tied duplicates
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def preset_parameter_counts(**overrides: Any) -> Dict[str, Dict[str, int]]:
    """``{preset: count_parameters(...)}`` for every preset (``overrides`` applied to each, e.g. a vocabulary
    size). With the defaults the paper presets include BERT's 30522 x 256 word embeddings."""
    return {name: count_parameters(get_preset(name, **overrides)) for name in PRESETS}
