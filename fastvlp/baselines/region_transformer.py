"""A UNITER-style single-stream Transformer over question tokens and region features, with a VQA head."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastvlp.baselines.box_features import box_features
from fastvlp.baselines.vqa_head import VQA_ANSWERS, VQAHead


def bert_base_config(**overrides):
    """BERT-base (12 layers, 768 wide, 12 heads, FFN 3072) with ``overrides`` applied; no dropout at test."""
    from transformers import BertConfig

    settings = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    attn_implementation="sdpa")
    return BertConfig(**{**settings, **overrides})


class RegionEmbeddings(nn.Module):
    """UNITER's image embeddings: LayerNorm(Linear(feature)) + LayerNorm(Linear(7-d box)), then LayerNorm."""

    def __init__(self, feature_dim: int, hidden: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.feature_linear = nn.Linear(feature_dim, hidden)
        self.feature_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.box_linear = nn.Linear(7, hidden)
        self.box_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)

    def forward(self, features: Tensor, boxes7: Tensor) -> Tensor:
        return self.norm(self.feature_norm(self.feature_linear(features)) + self.box_norm(self.box_linear(boxes7)))


class RegionTransformer(nn.Module):
    """``transformers.BertModel`` over ``[text embeddings; region embeddings]`` with one attention mask,
    and a VQA head on BERT's pooled [CLS] (the pooler's dense layer and tanh, as UNITER and LXMERT).
    Images with fewer regions than the batch's longest are padded and masked."""

    def __init__(self, config=None, feature_dim: int = 2048, num_answers: int = VQA_ANSWERS):
        super().__init__()
        from transformers import BertModel

        config = bert_base_config() if config is None else config
        self.bert = BertModel(config, add_pooling_layer=True)
        self.regions = RegionEmbeddings(feature_dim, config.hidden_size, config.layer_norm_eps)
        self.head = VQAHead(config.hidden_size, num_answers, config.layer_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, features: Sequence[Tensor],
                boxes: Sequence[Tensor], image_size) -> Tensor:
        """``[B, num_answers]`` logits. ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` (1/True =
        real token), per image ``features`` ``[N_i, feature_dim]`` and ``boxes`` ``[N_i, 4]`` in pixels of
        an image of ``image_size`` ``(H, W)``."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected the shape of input_ids {list(input_ids.shape)}")
        if len(features) != input_ids.shape[0] or len(boxes) != input_ids.shape[0]:
            raise ValueError(f"features, boxes: expected {input_ids.shape[0]} per-image tensors each, got {len(features)}, {len(boxes)}")
        counts = [f.shape[0] for f in features]
        padded_features = nn.utils.rnn.pad_sequence(list(features), batch_first=True)
        padded_boxes = nn.utils.rnn.pad_sequence([box_features(b.float(), image_size) for b in boxes], batch_first=True)
        region_mask = torch.arange(max(counts, default=0), device=input_ids.device)[None] < torch.tensor(counts, device=input_ids.device)[:, None]
        text = self.bert.embeddings(input_ids=input_ids)
        regions = self.regions(padded_features.to(text.dtype), padded_boxes.to(text.dtype))
        hidden = torch.cat((text, regions.to(text.dtype)), dim=1)
        mask = torch.cat((attention_mask.bool(), region_mask), dim=1)
        additive = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        additive = additive.masked_fill(~mask, torch.finfo(hidden.dtype).min)[:, None, None, :]
        sequence = self.bert.encoder(hidden, attention_mask=additive).last_hidden_state
        return self.head(self.bert.pooler(sequence))
