"""Typed outputs of :class:`fastvlp.models.E2EVLP`. Tensors are batch-first."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor


@dataclass
class EncoderOutput:
    """The encoder's output sequence ``[CLS] text [SEP] image-tokens`` (or image tokens only).

    ``memory`` ``[B, S, d]``; ``padding_mask`` bool ``[B, S]`` (True = padding); ``pos`` ``[B, S, d]``,
    the position encodings added to the memory's keys in cross-attention (zero on text positions,
    whose positions are in their embeddings); ``text_length`` T, the number of leading text positions
    (0 for an image-only pass); ``spatial_shape`` the image feature map's ``(H, W)``.
    """

    memory: Tensor
    padding_mask: Tensor
    pos: Tensor
    text_length: int
    spatial_shape: tuple

    @property
    def text_hidden(self) -> Tensor:
        """``[B, T, d]``: the text positions of the memory."""
        return self.memory[:, : self.text_length]

    @property
    def cls_hidden(self) -> Tensor:
        """``[B, d]``: the [CLS] position (the first text token)."""
        if self.text_length == 0:
            raise ValueError("an image-only encoder output has no [CLS] position")
        return self.memory[:, 0]

    def select(self, rows: Tensor) -> "EncoderOutput":
        """The outputs of the batch rows ``rows`` (an int64 index tensor)."""
        return EncoderOutput(
            self.memory.index_select(0, rows),
            self.padding_mask.index_select(0, rows),
            self.pos.index_select(0, rows),
            self.text_length,
            self.spatial_shape,
        )

    def repeat_interleave(self, repeats: int) -> "EncoderOutput":
        """Each row repeated ``repeats`` times in place (e.g. one copy per beam)."""
        return EncoderOutput(
            self.memory.repeat_interleave(repeats, 0),
            self.padding_mask.repeat_interleave(repeats, 0),
            self.pos.repeat_interleave(repeats, 0),
            self.text_length,
            self.spatial_shape,
        )


@dataclass
class DetectionOutput:
    """Detection predictions of the last decoder layer: ``pred_logits`` ``[B, Q, num_classes + 1]`` (the
    last class is no-object), ``pred_boxes`` ``[B, Q, 4]`` normalised cxcywh, ``pred_attributes``
    ``[B, Q, A]`` logits (None without an attribute head), and ``aux_outputs``, one dict with the same
    keys per earlier decoder layer (empty without auxiliary losses)."""

    pred_logits: Tensor
    pred_boxes: Tensor
    pred_attributes: Optional[Tensor] = None
    aux_outputs: List[Dict[str, Tensor]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        """DETR's output dict, the input of :class:`fastvlp.nn.criterion.SetCriterion`."""
        outputs: Dict[str, object] = {"pred_logits": self.pred_logits, "pred_boxes": self.pred_boxes}
        if self.pred_attributes is not None:
            outputs["pred_attributes"] = self.pred_attributes
        outputs["aux_outputs"] = self.aux_outputs
        return outputs


@dataclass
class PretrainingOutput:
    """What a pre-training forward returns.

    ``loss``: the weighted sum ``L_mlm + L_itm + L_v + L_dec`` of the tasks the batch carried.
    ``losses``: ``loss_mlm``, ``loss_itm``, ``loss_det`` (L_v, weighted over its terms and layers),
    ``loss_cap``, each present when its task ran, plus the set criterion's unweighted terms
    (``loss_ce``, ``loss_bbox``, ``loss_giou``, ``loss_attr``, with ``_i`` for auxiliary layer ``i``)
    and its logging values (``class_error``, ``cardinality_error``).
    ``mlm_logits`` ``[B, T, V]``; ``itm_logits`` ``[B, 2]``; ``detection`` the predictions for the rows
    ``detection_rows`` of the batch (the matched pairs with targets; in training with query groups, each
    group's in turn, see :attr:`E2EVLP.detection_query_groups`); ``caption_logits`` ``[B, Tc - 1, V]``
    for the caption's tokens 1 .. Tc - 1. Outputs of tasks that did not run are None.
    """

    loss: Tensor
    losses: Dict[str, Tensor]
    mlm_logits: Optional[Tensor] = None
    itm_logits: Optional[Tensor] = None
    detection: Optional[DetectionOutput] = None
    detection_rows: Optional[Tensor] = None
    caption_logits: Optional[Tensor] = None

    def detached_losses(self) -> Dict[str, float]:
        """The losses as Python floats, for logging (one host sync)."""
        names = ["loss"] + list(self.losses)
        values = torch.stack([self.loss.detach().float()] + [v.detach().float() for v in self.losses.values()]).tolist()
        return dict(zip(names, values))
