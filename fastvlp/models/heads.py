"""Output heads: token prediction (MLM and captioning, tied to the word embeddings), image-text matching,
and DETR's detection heads (class, attributes, box)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head is a 3-layer one)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class TokenPredictionHead(nn.Module):
    """BERT's LM prediction head: dense + GELU + LayerNorm, then a vocabulary projection whose weight is the
    word embedding matrix (tied) and whose bias is this head's own."""

    def __init__(self, d_model: int, word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12):
        super().__init__()
        if not isinstance(word_embeddings, nn.Embedding) or word_embeddings.embedding_dim != d_model:
            raise ValueError(f"word_embeddings: expected an nn.Embedding of width {d_model}")
        self.dense = nn.Linear(d_model, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.decoder = nn.Linear(d_model, word_embeddings.num_embeddings, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` -> ``[..., vocab_size]`` logits."""
        return self.decoder(self.layer_norm(F.gelu(self.dense(hidden)))) + self.bias


class ImageTextMatchingHead(nn.Module):
    """Matched / mismatched classifier on the last encoder layer's [CLS] vector: BERT's pooler (dense +
    tanh), then two logits (index 1 = matched)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, 2)

    def forward(self, cls_hidden: Tensor) -> Tensor:
        """``[B, d]`` -> ``[B, 2]``."""
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))


class DetectionHeads(nn.Module):
    """Per-query class logits (``num_classes + 1``, the last is no-object), attribute logits
    (``num_attributes``, absent when 0) and sigmoid cxcywh boxes from a 3-layer MLP, absolute or (given
    reference boxes) offsets in logit space from them."""

    def __init__(self, d_model: int, num_classes: int, num_attributes: int = 0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        if isinstance(num_attributes, bool) or not isinstance(num_attributes, int) or num_attributes < 0:
            raise ValueError(f"num_attributes: expected a non-negative int, got {num_attributes!r}")
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.attribute_embed = nn.Linear(d_model, num_attributes) if num_attributes else None
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.num_classes, self.num_attributes = num_classes, num_attributes

    def start_boxes_at_reference(self) -> None:
        """Zero the box MLP's last layer, so that with reference boxes each query first predicts its
        reference box (Deformable DETR's and DAB-DETR's initialisation)."""
        with torch.no_grad():
            self.bbox_embed.layers[-1].weight.zero_()
            self.bbox_embed.layers[-1].bias.zero_()

    def forward(self, hidden: Tensor, reference: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``hidden`` ``[..., Q, d]`` -> ``pred_logits``, ``pred_boxes`` and (with attributes) ``pred_attributes``;
        ``reference`` ``[..., Q, 4]`` (normalised cxcywh): the boxes are ``sigmoid(MLP(hidden) + logit(reference))``."""
        box_logits = self.bbox_embed(hidden)
        if reference is not None:
            # clamped so that boxes at the border stay finite
            box_logits = box_logits + torch.logit(reference, eps=1e-5).to(box_logits.dtype)
        outputs = {"pred_logits": self.class_embed(hidden), "pred_boxes": box_logits.sigmoid()}
        if self.attribute_embed is not None:
            outputs["pred_attributes"] = self.attribute_embed(hidden)
        return outputs


def split_decoder_layers(per_layer: Dict[str, Tensor]) -> Dict[str, object]:
    """``{key: [L, B, Q, ...]}`` -> DETR's layout: the last layer's tensors plus ``aux_outputs``, a list of
    dicts for layers ``0 .. L-2``."""
    outputs: Dict[str, object] = {key: value[-1] for key, value in per_layer.items()}
    num_layers = next(iter(per_layer.values())).shape[0]
    aux: List[Dict[str, Tensor]] = [{key: value[index] for key, value in per_layer.items()} for index in range(num_layers - 1)]
    outputs["aux_outputs"] = aux
    return outputs
