"""E2E-VLP (Xu et al., ACL 2021): a ResNet backbone and a Transformer encoder-decoder trained from pixels on
masked language modelling, image-text matching, DETR-style detection with attributes, and captioning.

Data flow of a pre-training step (one backbone pass, two encoder passes, two decoder passes):

* the backbone turns the images into image tokens with 2-D sine position encodings;
* encoder pass 1 reads ``[CLS] text [SEP] image-tokens`` under one key-padding mask: MLM on the text
  positions, ITM on [CLS], and the detection decoder (learned queries) cross-attends to it;
* encoder pass 2 reads the image tokens alone: the caption decoder (shifted caption, causal) cross-attends
  to it, so the caption is never visible to the encoder;
* the detection and caption decoders are one module (shared weights), with a head per task;
* with ``contrastive_loss_weight`` > 0 (not the paper's), a third encoder pass reads each caption alone, and
  its [CLS] and the mean of pass 2's image tokens meet in an image-text contrastive loss.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.models.anchor_queries import AnchorQueries
from fastvlp.models.backbone import Backbone, VisualTokens, check_images
from fastvlp.models.config import E2EVLPConfig
from fastvlp.models.contrastive import ContrastiveHead, contrastive_loss, masked_mean
from fastvlp.models.heads import DetectionHeads, ImageTextMatchingHead, TokenPredictionHead, split_decoder_layers
from fastvlp.models.masking import IGNORE_INDEX
from fastvlp.models.outputs import DetectionOutput, EncoderOutput, PretrainingOutput
from fastvlp.models.pretraining_batch import PretrainingBatch
from fastvlp.models.query_groups import queries_by_group, repeat_batch, repeat_targets
from fastvlp.models.token_detection import TokenDetectionHead, per_image_targets, token_centres, token_detection_losses
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


def _check_text(input_ids: Tensor, text_attention_mask: Tensor) -> None:
    if not isinstance(text_attention_mask, Tensor) or text_attention_mask.dtype != torch.bool:
        raise TypeError("text_attention_mask: expected a bool tensor [B, T] (True = real token)")
    if not isinstance(input_ids, Tensor) or text_attention_mask.shape != input_ids.shape:
        raise ValueError(f"text_attention_mask: expected the shape of input_ids, got {list(text_attention_mask.shape)}")


class E2EVLP(nn.Module):
    """The E2E-VLP model. Build it from an :class:`E2EVLPConfig` or :meth:`from_preset`.

    ``forward(batch)`` runs pre-training (see :class:`PretrainingBatch` and :class:`PretrainingOutput`);
    :meth:`encode`, :meth:`encode_image_only`, :meth:`encode_text_only`, :meth:`detect`, :meth:`caption_logits`,
    :meth:`mlm_logits`, :meth:`itm_logits` and :meth:`contrastive_loss` expose the parts for fine-tuning and
    inference.
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
        # DETR's free query embeddings, or DAB-DETR's anchor boxes (``config.anchor_queries``); with
        # ``config.query_groups``, that many sets of them, the first of which inference uses.
        total_queries = config.num_queries * config.query_groups
        self.query_embed = None if config.anchor_queries else nn.Embedding(total_queries, d)
        self.query_anchors = AnchorQueries(total_queries, d) if config.anchor_queries else None
        word_embeddings = self.text_embeddings.word_embeddings
        self.mlm_head = TokenPredictionHead(d, word_embeddings, config.layer_norm_eps)
        self.itm_head = ImageTextMatchingHead(d)
        self.detection_heads = self._new_detection_heads(config.num_classes, config.num_attributes)
        self.token_detection_head = self._new_token_detection_head(config.num_classes)
        self.caption_head = TokenPredictionHead(d, word_embeddings, config.layer_norm_eps)
        self.contrastive_head = ContrastiveHead(d, config.contrastive_dim) if config.contrastive_loss_weight > 0 else None
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

    def _new_token_detection_head(self, num_classes: int) -> Optional[TokenDetectionHead]:
        if self.config.token_detection_loss_weight == 0:
            return None
        return TokenDetectionHead(self.config.d_model, num_classes)

    def replace_detection_heads(self, num_classes: int, num_attributes: int = 0) -> None:
        """New, freshly initialised detection heads (e.g. COCO's categories for detection fine-tuning),
        and a criterion for them. The config is updated to match."""
        device = self.decoder.norm.weight.device
        self.detection_heads = self._new_detection_heads(num_classes, num_attributes).to(device)
        head = self._new_token_detection_head(num_classes)
        self.token_detection_head = None if head is None else head.to(device)
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
        _check_text(input_ids, text_attention_mask)
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

    def encode_text_only(self, input_ids: Tensor, text_attention_mask: Tensor, *,
                         token_type_ids: Optional[Tensor] = None) -> EncoderOutput:
        """Encode ``[CLS] text [SEP]`` alone, with no image tokens (the text side of
        :meth:`contrastive_loss`)."""
        _check_text(input_ids, text_attention_mask)
        text = self.text_embeddings(input_ids, token_type_ids)
        return self._run_encoder(text, ~text_attention_mask, text.new_zeros(text.shape), input_ids.shape[1], (0, 0))

    # ------------------------------------------------------------------ heads on the encoder

    def mlm_logits(self, encoded: EncoderOutput) -> Tensor:
        """``[B, T, vocab_size]`` token logits at the text positions."""
        return self.mlm_head(encoded.text_hidden)

    def contrastive_embeddings(self, visual: VisualTokens, input_ids: Tensor,
                               text_attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Unit vectors ``[B, dim]`` of each image (its image-only encoder pass, mean-pooled) and of each
        text (its text-only pass's [CLS]) in the contrastive space. Needs ``config.contrastive_loss_weight``
        > 0."""
        if self.contrastive_head is None:
            raise ValueError("contrastive_loss_weight: the model has no contrastive head (the weight is 0)")
        image = self.encode_image_only(None, None, visual_tokens=visual)
        text = self.encode_text_only(input_ids, text_attention_mask)
        text_embeddings, image_embeddings = self.contrastive_head(text.cls_hidden, masked_mean(image.memory, image.padding_mask))
        return image_embeddings, text_embeddings

    def contrastive_loss(self, visual: VisualTokens, input_ids: Tensor, text_attention_mask: Tensor,
                         image_ids: Optional[Tensor] = None) -> Tensor:
        """The in-batch image-text contrastive loss of the matched pairs (image row ``i`` of ``visual``,
        text row ``i``); ``image_ids`` marks rows that repeat an image (see
        :func:`fastvlp.models.contrastive.contrastive_loss`)."""
        image_embeddings, text_embeddings = self.contrastive_embeddings(visual, input_ids, text_attention_mask)
        return contrastive_loss(image_embeddings, text_embeddings, self.contrastive_head.logit_scale, image_ids)

    def itm_logits(self, encoded: EncoderOutput) -> Tensor:
        """``[B, 2]`` image-text matching logits on [CLS] (index 1 = matched)."""
        return self.itm_head(encoded.cls_hidden)

    # ------------------------------------------------------------------ decoder

    @property
    def detection_query_groups(self) -> int:
        """How many query groups :meth:`detect` runs: ``config.query_groups`` in training mode, 1 (the
        first group) in eval mode. Its outputs hold that many rows per image, group-major; the targets
        go to the criterion through :func:`~fastvlp.models.query_groups.repeat_targets` with this count."""
        return self.config.query_groups if self.training else 1

    def detect(self, encoded: EncoderOutput, *, aux_outputs: Optional[bool] = None) -> DetectionOutput:
        """Run the detection queries on ``encoded`` (usually an image-text memory). ``aux_outputs``
        (default: the config's ``aux_loss``) also returns every earlier decoder layer's predictions. With
        query groups in training mode, the outputs' batch is :attr:`detection_query_groups` times
        ``encoded``'s (row ``g * B + b`` is group ``g`` of image ``b``)."""
        if not isinstance(encoded, EncoderOutput):
            raise TypeError(f"encoded: expected an EncoderOutput, got {type(encoded).__name__}")
        with_aux = self.config.aux_loss if aux_outputs is None else bool(aux_outputs)
        groups = self.detection_query_groups
        memory, padding_mask, pos = (repeat_batch(t, groups) for t in (encoded.memory, encoded.padding_mask, encoded.pos))
        if self.query_anchors is not None:
            anchors = self.query_anchors.boxes()[: groups * self.config.num_queries]
            if self.config.two_stage:
                reference = self._token_proposals(encoded, anchors).transpose(0, 1)  # [Q, B, 4]
            else:
                reference = queries_by_group(anchors, groups, encoded.memory.shape[0])  # [Q, G * B, 4]
            outputs = self._detect_from_anchors(memory, padding_mask, pos, reference)
        else:
            queries = self.query_embed.weight[: groups * self.config.num_queries]
            query_pos = queries_by_group(queries, groups, encoded.memory.shape[0])
            hidden = self.decoder(
                torch.zeros_like(query_pos),
                memory.transpose(0, 1),
                memory_key_padding_mask=padding_mask,
                pos=pos.transpose(0, 1),
                query_pos=query_pos,
                return_intermediate=with_aux,
            )  # [L, Q, G * B, d]
            outputs = split_decoder_layers(self.detection_heads(hidden.transpose(1, 2)))
        if not with_aux:
            outputs["aux_outputs"] = []
        return DetectionOutput(
            outputs["pred_logits"], outputs["pred_boxes"], outputs.get("pred_attributes"), outputs["aux_outputs"]
        )

    def _token_proposals(self, encoded: EncoderOutput, anchors: Tensor) -> Tensor:
        """Two-stage reference boxes ``[B, Q, 4]``: the token head's boxes of each image's ``num_queries``
        image tokens with the highest class score (padding last), detached as Deformable DETR's are; where
        the feature map has fewer tokens than queries, the learned ``anchors`` fill the rest."""
        predicted, padding = self._token_predictions(encoded)
        scores = predicted["logits"].detach().float().amax(-1).masked_fill(padding, float("-inf"))
        count = min(self.config.num_queries, scores.shape[1])
        best = scores.topk(count, dim=1).indices
        boxes = predicted["boxes"].detach().gather(1, best[..., None].expand(-1, -1, 4))
        if count < self.config.num_queries:
            boxes = torch.cat((boxes, anchors[None, count:].expand(boxes.shape[0], -1, -1).to(boxes)), dim=1)
        return boxes

    def _detect_from_anchors(self, memory: Tensor, padding_mask: Tensor, pos: Tensor, reference: Tensor) -> Dict[str, object]:
        """The decoder layer by layer from the ``reference`` boxes ``[Q, B, 4]``: each layer's positional
        queries come from the boxes the layer before it predicted (the references for the first), and its
        boxes are offsets from them. The boxes passed on are detached, as in DAB-DETR and Deformable DETR,
        so each layer's box loss trains that layer's offsets only."""
        decoder = self.decoder
        dtype = decoder.norm.weight.dtype
        memory, pos = memory.transpose(0, 1).to(dtype), pos.transpose(0, 1)
        output = memory.new_zeros(reference.shape[0], reference.shape[1], memory.shape[-1])
        per_layer: Dict[str, List[Tensor]] = {}
        for layer in decoder.layers:
            query_pos = self.query_anchors.positional_query(reference).to(dtype)
            output = layer(output, memory, memory_key_padding_mask=padding_mask, pos=pos, query_pos=query_pos)
            heads = self.detection_heads(decoder.norm(output).transpose(0, 1), reference=reference.transpose(0, 1))
            for key, value in heads.items():
                per_layer.setdefault(key, []).append(value)
            reference = heads["pred_boxes"].detach().transpose(0, 1)
        return split_decoder_layers({key: torch.stack(values) for key, values in per_layer.items()})

    def token_detection_losses(self, encoded: EncoderOutput, targets: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
        """The one-to-many auxiliary losses of the encoder's image tokens (``loss_token`` and its terms, see
        :mod:`fastvlp.models.token_detection`) against ``targets``, DETR's per-image dicts, one for each
        row of ``encoded``. Needs ``config.token_detection_loss_weight`` > 0."""
        predicted, padding = self._token_predictions(encoded)
        return token_detection_losses(predicted["logits"], predicted["boxes"], predicted["centres"], ~padding, targets)

    def _token_predictions(self, encoded: EncoderOutput):
        """The token head's ``logits``, ``boxes`` and ``centres`` for ``encoded``'s image tokens, and their
        padding ``[B, H * W]``."""
        if self.token_detection_head is None:
            raise ValueError("token_detection_loss_weight: the model has no token detection head (the weight is 0)")
        height, width = encoded.spatial_shape
        batch, text = encoded.memory.shape[0], encoded.text_length
        padding = encoded.padding_mask[:, text:].reshape(batch, height, width)
        centres = token_centres(padding).flatten(1, 2)
        predicted = self.token_detection_head(encoded.memory[:, text:], centres, (height, width))
        return {**predicted, "centres": centres}, padding.flatten(1)

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
                rows_encoding = encoded.select(output.detection_rows)
                output.detection = self.detect(rows_encoding)
                detection_losses = self.criterion(output.detection.as_dict(),
                                                  repeat_targets(targets, self.detection_query_groups))
                losses["loss_det"] = self.criterion.weighted_total(detection_losses)
                losses.update(detection_losses)
                if self.token_detection_head is not None:
                    token_losses = self.token_detection_losses(rows_encoding, per_image_targets(targets))
                    losses.update(token_losses)
                    losses["loss_det"] = losses["loss_det"] + config.token_detection_loss_weight * token_losses["loss_token"]
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
            if self.contrastive_head is not None:
                # each image against its own caption, the one text of every row that is unmasked and matched;
                # a batch's two copies of one image (Visual Genome's of a COCO image) count as negatives here
                text_only = self.encode_text_only(batch.caption_ids, batch.caption_attention_mask)
                text_embeddings, image_embeddings = self.contrastive_head(
                    text_only.cls_hidden, masked_mean(image_only.memory, image_only.padding_mask))
                losses["loss_contrastive"] = contrastive_loss(image_embeddings, text_embeddings,
                                                              self.contrastive_head.logit_scale)
                weighted.append(config.contrastive_loss_weight * losses["loss_contrastive"])
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
