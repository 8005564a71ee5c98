"""``E2EVLPConfig``: every size, backend and loss weight of an E2E-VLP model, serialisable as JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping

from fastvlp.nn.matcher import MATCHER_BACKENDS
from fastvlp.nn.transformer_layers import ATTENTION_BACKENDS

BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ATTRIBUTE_LOSSES = ("softmax", "bce")

_POSITIVE_INTS = (
    "d_model", "num_heads", "ffn_dim", "num_encoder_layers", "num_decoder_layers", "num_queries", "vocab_size",
    "max_text_len", "type_vocab_size", "num_classes", "query_groups", "contrastive_dim",
)
_NON_NEGATIVE_INTS = ("num_attributes", "pad_token_id", "backbone_frozen_stages")
_NON_NEGATIVE_FLOATS = (
    "class_loss_weight", "bbox_loss_weight", "giou_loss_weight", "attribute_loss_weight", "match_cost_class",
    "match_cost_bbox", "match_cost_giou", "mlm_loss_weight", "itm_loss_weight", "detection_loss_weight",
    "caption_loss_weight", "token_detection_loss_weight", "contrastive_loss_weight", "lr", "lr_backbone", "weight_decay", "clip_max_norm",
)
_PROBABILITIES = ("dropout", "no_object_weight", "mlm_probability", "itm_negative_ratio")


@dataclass
class E2EVLPConfig:
    """Configuration of :class:`fastvlp.models.E2EVLP`. Defaults are the paper's 6-layer ResNet-50 model.

    Architecture: ``backbone`` (torchvision ResNet name), ``frozen_batch_norm`` (FrozenBatchNorm2d in the
    backbone, as the paper; plain trainable BatchNorm2d otherwise), ``backbone_frozen_stages`` (0: the whole
    backbone trains; k in 1..4: the stem and layer1..layer<k> are frozen; 1 is DETR's choice),
    ``backbone_output`` (``"c5"``, the paper's stride-32 map; ``"c4"``, stride 16; or ``"dc5"``, DETR's
    dilated C5 at stride 16), ``d_model``,
    ``num_heads`` (must divide ``d_model``), ``ffn_dim``, ``num_encoder_layers``, ``num_decoder_layers``
    (the decoder shared by detection and captioning), ``dropout``, ``activation`` of the feed-forward networks.

    Text: ``vocab_size`` (set it from the tokenizer), ``max_text_len`` (learned positions, shared by
    the encoder text and the decoder captions), ``type_vocab_size`` (segment ids), ``pad_token_id``,
    ``layer_norm_eps`` (of the embeddings and the token-prediction heads, BERT's 1e-12).

    Detection: ``num_queries``, ``num_classes`` (a no-object class is added), ``num_attributes`` (0 = no
    attribute head), ``attribute_loss`` (``"softmax"``: cross-entropy over the attributes, averaged over an
    object's labels, as bottom-up attention trains them and the paper's ``-log p(a)`` reads; ``"bce"``:
    independent sigmoids), ``aux_loss`` (a detection loss at every decoder layer), ``anchor_queries`` (DAB-DETR's
    learned anchor boxes as the queries, refined layer by layer, in place of DETR's free query embeddings),
    ``query_groups`` (Group DETR: in training, that many independent groups of ``num_queries`` queries, each
    matched to the targets on its own; inference reads the first group; 1 is DETR),
    ``token_detection_loss_weight`` (0: none; else Co-DETR's one-to-many auxiliary head on the encoder's
    image tokens, :mod:`fastvlp.models.token_detection`, its loss added to the detection loss with this
    weight), ``two_stage`` (Deformable DETR's two-stage queries: the anchor boxes are the token head's
    ``num_queries`` best-scored image-token boxes, per image; needs ``anchor_queries``, a token detection
    head and one query group).

    Alignment: ``contrastive_loss_weight`` (0: none; else ALBEF's image-text contrastive loss on text-only
    and image-only encoder passes, :mod:`fastvlp.models.contrastive`, added with this weight to retrieval
    fine-tuning's loss, and to pre-training's over each image and its caption), ``contrastive_dim`` (the
    size of its shared projection space).

    Losses and matching: ``class_loss_weight`` 1, ``no_object_weight`` 0.1, ``bbox_loss_weight`` (L1) 5,
    ``giou_loss_weight`` 2, ``attribute_loss_weight`` 1; matching costs ``match_cost_class`` 1,
    ``match_cost_bbox`` 5, ``match_cost_giou`` 2; task weights ``mlm_loss_weight``, ``itm_loss_weight``,
    ``detection_loss_weight``, ``caption_loss_weight`` (all 1: ``L = L_mlm + L_itm + L_v + L_dec``);
    ``mlm_probability`` 0.15 and ``itm_negative_ratio`` 0.5 for building pre-training batches.

    Backends: ``attention_backend`` (``"fastvlp"``, ``"triton"`` or ``"torch"``), ``matcher_backend``
    (``"fastvlp"`` or ``"scipy"``).

    Optimisation (read by the trainer): ``lr`` (Transformer and heads), ``lr_backbone``, ``weight_decay``,
    ``clip_max_norm`` (gradient clipping).
    """

    backbone: str = "resnet50"
    frozen_batch_norm: bool = True
    backbone_frozen_stages: int = 1
    backbone_output: str = "c5"
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 1024
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    activation: str = "relu"

    vocab_size: int = 30522
    max_text_len: int = 40
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12

    num_queries: int = 100
    num_classes: int = 1600
    num_attributes: int = 400
    attribute_loss: str = "softmax"
    aux_loss: bool = True
    anchor_queries: bool = False
    query_groups: int = 1
    token_detection_loss_weight: float = 0.0
    two_stage: bool = False
    contrastive_loss_weight: float = 0.0
    contrastive_dim: int = 256

    class_loss_weight: float = 1.0
    no_object_weight: float = 0.1
    bbox_loss_weight: float = 5.0
    giou_loss_weight: float = 2.0
    attribute_loss_weight: float = 1.0
    match_cost_class: float = 1.0
    match_cost_bbox: float = 5.0
    match_cost_giou: float = 2.0
    mlm_loss_weight: float = 1.0
    itm_loss_weight: float = 1.0
    detection_loss_weight: float = 1.0
    caption_loss_weight: float = 1.0
    mlm_probability: float = 0.15
    itm_negative_ratio: float = 0.5

    attention_backend: str = "fastvlp"
    matcher_backend: str = "fastvlp"

    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1

    def __post_init__(self) -> None:
        for name in ("frozen_batch_norm", "aux_loss", "anchor_queries", "two_stage"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        for name in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            if value < (1 if name in _POSITIVE_INTS else 0):
                raise ValueError(f"{name}: expected {'a positive' if name in _POSITIVE_INTS else 'a non-negative'} int, got {value}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}: choose a head count that divides it "
                f"(e.g. 8 for d_model=256)"
            )
        if self.d_model % 2:
            raise ValueError(f"d_model: expected an even number (half of it encodes y, half x), got {self.d_model}")
        for name in _NON_NEGATIVE_FLOATS + _PROBABILITIES + ("layer_norm_eps",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value}")
        for name in _PROBABILITIES:
            if getattr(self, name) > 1 or (name == "dropout" and self.dropout >= 1):
                raise ValueError(f"{name}: expected a probability, got {getattr(self, name)}")
        if self.layer_norm_eps == 0:
            raise ValueError("layer_norm_eps: expected a positive number, got 0")
        if self.two_stage and not (self.anchor_queries and self.token_detection_loss_weight > 0 and self.query_groups == 1):
            raise ValueError("two_stage: needs anchor_queries=True, token_detection_loss_weight > 0 and query_groups=1, "
                             f"got {self.anchor_queries}, {self.token_detection_loss_weight} and {self.query_groups}")
        if self.match_cost_class == 0 and self.match_cost_bbox == 0 and self.match_cost_giou == 0:
            raise ValueError("match_cost_class, match_cost_bbox and match_cost_giou can't all be 0")
        choices = (
            ("backbone", BACKBONES), ("attribute_loss", ATTRIBUTE_LOSSES), ("attention_backend", ATTENTION_BACKENDS),
            ("matcher_backend", MATCHER_BACKENDS), ("activation", ("relu", "gelu")), ("backbone_output", ("c5", "c4", "dc5")),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.backbone_frozen_stages > 4:
            raise ValueError(
                f"backbone_frozen_stages: expected 0..4 (k freezes the stem and layer1..layer<k>), got {self.backbone_frozen_stages}"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is not below vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def replace(self, **changes: Any) -> "E2EVLPConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "E2EVLPConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (a typo must not pass silently)."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"values: unknown E2EVLPConfig fields {unknown}")
        return cls(**dict(values))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "E2EVLPConfig":
        if not isinstance(text, str):
            raise TypeError(f"text: expected a JSON str, got {type(text).__name__}")
        return cls.from_dict(json.loads(text))
