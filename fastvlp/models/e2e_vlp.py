"""E2E-VLP (Xu et al., ACL 2021): a ResNet backbone and a Transformer encoder-decoder trained from pixels on
masked language modelling, image-text matching, DETR-style detection with attributes, and captioning.

Data flow of a pre-training step (one backbone pass, two encoder passes, two decoder passes):

* the backbone turns the images into image tokens with 2-D sine position encodings;
* encoder pass 1 reads ``[CLS] text [SEP] image-tokens`` under one key-padding mask: MLM on the text
  positions, ITM on [CLS], and the detection decoder (learned queries) cross-attends to it;
* encoder pass 2 reads the image tokens alone: the caption decoder (shifted caption, causal) cross-attends
  to it, so the caption is never visible to the encoder;
* the detection and caption decoders are one module (shared weights), with a head per task.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.models.anchor_queries import AnchorQueries
from fastvlp.models.backbone import Backbone, VisualTokens, check_images
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.heads import DetectionHeads, ImageTextMatchingHead, TokenPredictionHead, split_decoder_layers
from fastvlp.models.masking import IGNORE_INDEX
from fastvlp.models.outputs import DetectionOutput, EncoderOutput, PretrainingOutput
from fastvlp.models.pretraining_batch import PretrainingBatch
from fastvlp.models.static_batch import with_static_targets
from fastvlp.models.text_embeddings import TextEmbeddings
from fastvlp.models.transformer import TransformerDecoder, TransformerEncoder
from fastvlp.nn.criterion import SetCriterion, build_weight_dict
from fastvlp.nn.matcher import HungarianMatcher


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labels that are not -100; 0 (still differentiable) when there are none."""
    flat_logits, flat_labels = logits.flatten(0, -2), labels.flatten()
    total = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)


class E2EVLP(nn.Module):
    """The E2E-VLP model. Build it from an :class:`E2EVLPConfig` or :meth:`from_preset`.

    ``forward(batch)`` runs pre-training (see :class:`PretrainingBatch` and :class:`PretrainingOutput`);
    :meth:`encode`, :meth:`encode_image_only`, :meth:`detect`, :meth:`caption_logits`,
    :meth:`mlm_logits` and :meth:`itm_logits` expose the parts for fine-tuning and inference.
    """

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        if not isinstance(config, E2EVLPConfig):
            raise TypeError(f"config: expected an E2EVLPConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.backbone = Backbone(config.backbone, d, config.frozen_batch_norm, config.backbone_frozen_stages,
                                 config.backbone_output)
        self.text_embeddings = TextEmbeddings(
            config.vocab_size, d, config.max_text_len, config.type_vocab_size, config.pad_token_id, config.dropout,
            config.layer_norm_eps,
        )
        layer_args = (d, config.num_heads, config.ffn_dim, config.dropout, config.activation, config.attention_backend)
        self.encoder = TransformerEncoder(config.num_encoder_layers, *layer_args)
        self.decoder = TransformerDecoder(config.num_decoder_layers, *layer_args)
        # DETR's free query embeddings, or DAB-DETR's anchor boxes (``config.anchor_queries``).
        self.query_embed = None if config.anchor_queries else nn.Embedding(config.num_queries, d)
        self.query_anchors = AnchorQueries(config.num_queries, d) if config.anchor_queries else None
        word_embeddings = self.text_embeddings.word_embeddings
        self.mlm_head = TokenPredictionHead(d, word_embeddings, config.layer_norm_eps)
        self.itm_head = ImageTextMatchingHead(d)
        self.detection_heads = self._new_detection_heads(config.num_classes, config.num_attributes)
        self.caption_head = TokenPredictionHead(d, word_embeddings, config.layer_norm_eps)
        self.criterion = self._build_criterion()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "E2EVLP":
        from fastvlp.models.presets import get_preset

        return cls(get_preset(name, **overrides))

    def _build_criterion(self) -> SetCriterion:
        config = self.config
        matcher = HungarianMatcher(
            config.match_cost_class, config.match_cost_bbox, config.match_cost_giou, backend=config.matcher_backend
        )
        with_attributes = self.detection_heads.num_attributes > 0
        weight_dict = build_weight_dict(
            config.class_loss_weight,
            config.bbox_loss_weight,
            config.giou_loss_weight,
            config.attribute_loss_weight if with_attributes else None,
            num_aux_layers=config.num_decoder_layers - 1 if config.aux_loss else 0,
        )
        losses = ("labels", "boxes", "cardinality") + (("attributes",) if with_attributes else ())
        return SetCriterion(
            self.detection_heads.num_classes, matcher, weight_dict, config.no_object_weight, losses,
            attribute_loss=config.attribute_loss,
        )

    def _new_detection_heads(self, num_classes: int, num_attributes: int) -> DetectionHeads:
        heads = DetectionHeads(self.config.d_model, num_classes, num_attributes)
        if self.config.anchor_queries:
            heads.start_boxes_at_reference()
        return heads

    def replace_detection_heads(self, num_classes: int, num_attributes: int = 0) -> None:
        """New, freshly initialised detection heads (e.g. COCO's categories for detection fine-tuning),
        and a criterion for them. The config is updated to match."""
        device = self.decoder.norm.weight.device
        self.detection_heads = self._new_detection_heads(num_classes, num_attributes).to(device)
        self.config = self.config.replace(num_classes=num_classes, num_attributes=num_attributes)
        self.criterion = self._build_criterion().to(device)

    def load_backbone_weights(self, source) -> None:
        """Load a torchvision ResNet state dict (path or mapping) into the backbone; see :class:`Backbone`."""
        self.backbone.load_backbone_weights(source)

    # ------------------------------------------------------------------ encoder

    def extract_visual_tokens(self, images: Tensor, pixel_mask: Tensor) -> VisualTokens:
        """The backbone pass: image tokens ``[B, HW, d]`` with their padding mask and position encodings."""
        return self.backbone(images, pixel_mask)

    def _visual(self, images, pixel_mask, visual_tokens) -> VisualTokens:
        if visual_tokens is not None:
            if not isinstance(visual_tokens, VisualTokens):
                raise TypeError(f"visual_tokens: expected VisualTokens, got {type(visual_tokens).__name__}")
            return visual_tokens
        check_images(images, pixel_mask)
        return self.backbone(images, pixel_mask)

    def _run_encoder(self, tokens: Tensor, padding_mask: Tensor, pos: Tensor, text_length: int, spatial_shape) -> EncoderOutput:
        memory = self.encoder(tokens.transpose(0, 1), padding_mask, pos.transpose(0, 1))
        return EncoderOutput(memory.transpose(0, 1), padding_mask, pos, text_length, spatial_shape)

    def encode(
        self,
        images: Optional[Tensor],
        pixel_mask: Optional[Tensor],
        input_ids: Tensor,
        text_attention_mask: Tensor,
        *,
        token_type_ids: Optional[Tensor] = None,
        visual_tokens: Optional[VisualTokens] = None,
    ) -> EncoderOutput:
        """Encode ``[CLS] text [SEP] image-tokens``.

        ``images`` ``[B, 3, H, W]`` and ``pixel_mask`` ``[B, H, W]`` (True = padding), or precomputed
        ``visual_tokens`` (then the images may be None); ``input_ids`` ``[B, T]`` with
        ``text_attention_mask`` bool ``[B, T]`` (True = real token).
        """
        visual = self._visual(images, pixel_mask, visual_tokens)
        if not isinstance(text_attention_mask, Tensor) or text_attention_mask.dtype != torch.bool:
            raise TypeError("text_attention_mask: expected a bool tensor [B, T] (True = real token)")
        if not isinstance(input_ids, Tensor) or text_attention_mask.shape != input_ids.shape:
            raise ValueError(f"text_attention_mask: expected the shape of input_ids, got {list(text_attention_mask.shape)}")
        if input_ids.shape[0] != visual.features.shape[0]:
            raise ValueError(f"input_ids: expected {visual.features.shape[0]} rows like the images, got {input_ids.shape[0]}")
        text = self.text_embeddings(input_ids, token_type_ids)
        # Text positions live in the text embeddings: their attention position encoding is zero.
        text_pos = visual.pos.new_zeros(text.shape)
        tokens = torch.cat((text, visual.features.to(text.dtype)), dim=1)
        padding_mask = torch.cat((~text_attention_mask, visual.padding_mask), dim=1)
        pos = torch.cat((text_pos, visual.pos), dim=1)
        return self._run_encoder(tokens, padding_mask, pos, input_ids.shape[1], visual.spatial_shape)

    def encode_image_only(
        self, images: Optional[Tensor], pixel_mask: Optional[Tensor], *, visual_tokens: Optional[VisualTokens] = None
    ) -> EncoderOutput:
        """Encode the image tokens alone (the memory the caption decoder reads)."""
        visual = self._visual(images, pixel_mask, visual_tokens)
        return self._run_encoder(visual.features, visual.padding_mask, visual.pos, 0, visual.spatial_shape)

    # ------------------------------------------------------------------ heads on the encoder

    def mlm_logits(self, encoded: EncoderOutput) -> Tensor:
        """``[B, T, vocab_size]`` token logits at the text positions."""
        return self.mlm_head(encoded.text_hidden)

    def itm_logits(self, encoded: EncoderOutput) -> Tensor:
        """``[B, 2]`` image-text matching logits on [CLS] (index 1 = matched)."""
        return self.itm_head(encoded.cls_hidden)

    # ------------------------------------------------------------------ decoder

    def detect(self, encoded: EncoderOutput, *, aux_outputs: Optional[bool] = None) -> DetectionOutput:
        """Run the detection queries on ``encoded`` (usually an image-text memory). ``aux_outputs``
        (default: the config's ``aux_loss``) also returns every earlier decoder layer's predictions."""
        if not isinstance(encoded, EncoderOutput):
            raise TypeError(f"encoded: expected an EncoderOutput, got {type(encoded).__name__}")
        with_aux = self.config.aux_loss if aux_outputs is None else bool(aux_outputs)
        if self.query_anchors is not None:
            outputs = self._detect_from_anchors(encoded)
        else:
            batch = encoded.memory.shape[0]
            query_pos = self.query_embed.weight[:, None].expand(-1, batch, -1)
            hidden = self.decoder(
                torch.zeros_like(query_pos),
                encoded.memory.transpose(0, 1),
                memory_key_padding_mask=encoded.padding_mask,
                pos=encoded.pos.transpose(0, 1),
                query_pos=query_pos,
                return_intermediate=with_aux,
            )  # [L, Q, B, d]
            outputs = split_decoder_layers(self.detection_heads(hidden.transpose(1, 2)))
        if not with_aux:
            outputs["aux_outputs"] = []
        return DetectionOutput(
            outputs["pred_logits"], outputs["pred_boxes"], outputs.get("pred_attributes"), outputs["aux_outputs"]
        )

    def _detect_from_anchors(self, encoded: EncoderOutput) -> Dict[str, object]:
        """The decoder layer by layer: each layer's positional queries come from the boxes the layer before
        it predicted (the anchors for the first), and its boxes are offsets from them. The boxes passed on
        are detached, as in DAB-DETR and Deformable DETR, so each layer's box loss trains that layer's
        offsets only."""
        decoder = self.decoder
        dtype = decoder.norm.weight.dtype
        batch = encoded.memory.shape[0]
        memory, pos = encoded.memory.transpose(0, 1).to(dtype), encoded.pos.transpose(0, 1)
        reference = self.query_anchors.boxes()[:, None].expand(-1, batch, -1)  # [Q, B, 4]
        output = memory.new_zeros(reference.shape[0], batch, memory.shape[-1])
        per_layer: Dict[str, List[Tensor]] = {}
        for layer in decoder.layers:
            query_pos = self.query_anchors.positional_query(reference).to(dtype)
            output = layer(output, memory, memory_key_padding_mask=encoded.padding_mask, pos=pos, query_pos=query_pos)
            heads = self.detection_heads(decoder.norm(output).transpose(0, 1), reference=reference.transpose(0, 1))
            for key, value in heads.items():
                per_layer.setdefault(key, []).append(value)
            reference = heads["pred_boxes"].detach().transpose(0, 1)
        return split_decoder_layers({key: torch.stack(values) for key, values in per_layer.items()})

    def caption_hidden(
        self,
        encoded: EncoderOutput,
        caption_input_ids: Tensor,
        caption_attention_mask: Optional[Tensor] = None,
        *,
        position_offset: int = 0,
    ) -> Tensor:
        """Decoder states ``[B, T, d]`` of the caption tokens ``caption_input_ids`` ``[B, T]`` (causal
        self-attention, padding masked with ``caption_attention_mask``, True = real token)."""
        if not isinstance(encoded, EncoderOutput):
            raise TypeError(f"encoded: expected an EncoderOutput, got {type(encoded).__name__}")
        if caption_attention_mask is not None and (
            not isinstance(caption_attention_mask, Tensor)
            or caption_attention_mask.dtype != torch.bool
            or caption_attention_mask.shape != caption_input_ids.shape
        ):
            raise ValueError("caption_attention_mask: expected a bool tensor shaped like caption_input_ids (True = real token)")
        if caption_input_ids.shape[0] != encoded.memory.shape[0]:
            raise ValueError(
                f"caption_input_ids: expected {encoded.memory.shape[0]} rows like the memory, got {caption_input_ids.shape[0]}"
            )
        tokens = self.text_embeddings(caption_input_ids, position_offset=position_offset)
        hidden = self.decoder(
            tokens.transpose(0, 1),
            encoded.memory.transpose(0, 1),
            tgt_key_padding_mask=None if caption_attention_mask is None else ~caption_attention_mask,
            memory_key_padding_mask=encoded.padding_mask,
            pos=encoded.pos.transpose(0, 1),
            causal=True,
        )
        return hidden[-1].transpose(0, 1)

    def caption_logits(
        self,
        encoded: EncoderOutput,
        caption_input_ids: Tensor,
        caption_attention_mask: Optional[Tensor] = None,
        *,
        position_offset: int = 0,
    ) -> Tensor:
        """``[B, T, vocab_size]``: at position t, the logits of the token after ``caption_input_ids[:, t]``."""
        return self.caption_head(
            self.caption_hidden(encoded, caption_input_ids, caption_attention_mask, position_offset=position_offset)
        )

    # ------------------------------------------------------------------ pre-training

    def forward(self, batch: Union[PretrainingBatch, Mapping]) -> PretrainingOutput:
        """One pre-training forward: the losses of every task whose inputs ``batch`` carries."""
        if isinstance(batch, Mapping):
            batch = PretrainingBatch.from_mapping(batch)
        elif not isinstance(batch, PretrainingBatch):
            raise TypeError(f"batch: expected a PretrainingBatch or a mapping, got {type(batch).__name__}")
        config = self.config
        for module in (self.encoder, self.decoder):
            for layer in module.layers:
                layer.attention_paths.clear()

        visual = self.backbone(batch.images, batch.pixel_mask)
        encoded = self.encode(None, None, batch.input_ids, batch.text_attention_mask, token_type_ids=batch.token_type_ids, visual_tokens=visual)
        losses: Dict[str, Tensor] = {}
        weighted: List[Tensor] = []
        output = PretrainingOutput(loss=encoded.memory.new_zeros(()), losses=losses)

        if batch.mlm_labels is not None:
            output.mlm_logits = self.mlm_logits(encoded)
            losses["loss_mlm"] = token_cross_entropy(output.mlm_logits, batch.mlm_labels)
            weighted.append(config.mlm_loss_weight * losses["loss_mlm"])
        if batch.itm_labels is not None:
            output.itm_logits = self.itm_logits(encoded)
            losses["loss_itm"] = F.cross_entropy(output.itm_logits.float(), batch.itm_labels)
            weighted.append(config.itm_loss_weight * losses["loss_itm"])
        if batch.targets is not None or batch.padded_targets is not None:
            rows, targets = self._detection_rows(batch, encoded.memory.device)
            if rows.numel():
                output.detection_rows = rows
                output.detection = self.detect(encoded.select(output.detection_rows))
                detection_losses = self.criterion(output.detection.as_dict(), targets)
                losses["loss_det"] = self.criterion.weighted_total(detection_losses)
                losses.update(detection_losses)
                weighted.append(config.detection_loss_weight * losses["loss_det"])
            else:  # under DDP the other processes' criterion averages box counts: match their collectives
                self.criterion.join_counts_without_targets(encoded.memory.device)
        if batch.caption_ids is not None:
            image_only = self.encode_image_only(None, None, visual_tokens=visual)
            output.caption_logits = self.caption_logits(
                image_only, batch.caption_ids[:, :-1], batch.caption_attention_mask[:, :-1]
            )
            caption_labels = batch.caption_ids[:, 1:].masked_fill(~batch.caption_attention_mask[:, 1:], IGNORE_INDEX)
            losses["loss_cap"] = token_cross_entropy(output.caption_logits, caption_labels)
            weighted.append(config.caption_loss_weight * losses["loss_cap"])
        if weighted:
            output.loss = torch.stack(weighted).sum()
        return output

    def static_batch(self, batch: PretrainingBatch, max_targets: Optional[int]) -> PretrainingBatch:
        """``batch`` (on the host) with its detection rows chosen and their targets padded to ``max_targets``
        objects, or to their own largest count with None (:func:`~fastvlp.models.static_batch.with_static_targets`):
        the form whose forward reads nothing back from the device, which a captured training step needs."""
        return with_static_targets(batch, max_targets, self.config.num_classes, self.config.num_attributes or None)

    def _detection_rows(self, batch: PretrainingBatch, device: torch.device):
        """The rows that go to detection (matched pairs with targets) on ``device``, and their targets: the
        batch's padded ones where it carries them and the batched solver matches (nothing is read back from the
        device), else DETR's per-image dicts."""
        if batch.padded_targets is not None and self.criterion._assigns_densely():
            return batch.detection_rows.to(device), batch.padded_targets
        if batch.detection_rows is not None and batch.targets is not None:
            rows = batch.detection_rows.tolist()
        else:
            if batch.targets is None:
                raise ValueError("batch: padded_targets need the batched solver (matcher_backend='fastvlp'); "
                                 "give targets too for any other matcher")
            matched = [True] * batch.batch_size if batch.itm_labels is None else (batch.itm_labels == 1).tolist()
            rows = [i for i, target in enumerate(batch.targets) if target is not None and matched[i]]
        return torch.tensor(rows, dtype=torch.int64, device=device), [batch.targets[i] for i in rows]

    # ------------------------------------------------------------------ introspection and optimisation

    def backend_report(self) -> Dict[str, object]:
        """Which implementations ran: ``attention`` (one string when every attention role took the same
        path, e.g. ``"triton"``, ``"reference"``, ``"torch.nn.MultiheadAttention"``), ``attention_by_role``
        (per role, from the last call of each role; empty before any forward), ``matcher``
        (``"fastvlp"`` or ``"scipy"``) and ``matcher_device`` (where the last matching ran, or None)."""
        by_role = {}
        for module in (self.encoder, self.decoder):  # a fine-tuning model may have dropped the decoder
            if module is not None:
                by_role.update(module.attention_paths())
        paths = sorted(set(by_role.values()))
        if not paths:
            summary = "not run yet"
        elif len(paths) == 1:
            summary = paths[0]
        else:
            summary = "mixed: " + ", ".join(paths)
        device = self.criterion.last_match_device
        return {
            "attention": summary,
            "attention_by_role": by_role,
            "attention_backend": self.config.attention_backend,
            "matcher": self.criterion.matcher.backend,
            "matcher_device": None if device is None else device.type,
        }

    def parameter_groups(self) -> List[Dict[str, object]]:
        """AdamW parameter groups: the trainable backbone parameters at ``lr_backbone``, the rest at ``lr``,
        all with the config's ``weight_decay``. Frozen parameters are left out."""
        backbone_ids = {id(p) for p in self.backbone.body.parameters()}
        main, backbone = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (backbone if id(parameter) in backbone_ids else main).append(parameter)
        groups = [{"params": main, "lr": self.config.lr, "weight_decay": self.config.weight_decay}]
        if backbone:
            groups.append({"params": backbone, "lr": self.config.lr_backbone, "weight_decay": self.config.weight_decay})
        return groups
