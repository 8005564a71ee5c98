"""The two-stage region-feature pipeline: bottom-up-attention features, then a UNITER-style BERT for VQA.

``RegionPipeline`` runs a Faster R-CNN R101-C4 (:class:`BottomUpC4Detector`), keeps 10 to 100 boxes of
confidence >= 0.2 (``box_selection="thresholded"``) or a fixed 36 (``"fixed"``) with their 2048-d RoI
features, and answers with a 12-layer BERT over the question and the regions. Its stages,
:meth:`~RegionPipeline.backbone`, :meth:`~RegionPipeline.rpn`, :meth:`~RegionPipeline.roi_heads` and
:meth:`~RegionPipeline.bert`, can be timed separately.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from fastvlp.baselines.box_selection import BOX_SELECTIONS
from fastvlp.baselines.detector_c4 import BottomUpC4Detector, RegionDetections
from fastvlp.baselines.region_transformer import RegionTransformer
from fastvlp.baselines.vqa_head import VQA_ANSWERS


@dataclass
class RegionOutput:
    """``logits`` ``[B, num_answers]`` and each image's :class:`RegionDetections` (boxes, features, ...)."""

    logits: Tensor
    detections: List[RegionDetections]

    @property
    def boxes(self) -> List[Tensor]:
        return [d.boxes for d in self.detections]

    @property
    def features(self) -> List[Tensor]:
        return [d.features for d in self.detections]


class RegionPipeline(nn.Module):
    """Bottom-up-attention region features and a UNITER-style VQA model, with seeded random weights.

    ``box_selection``: ``"thresholded"`` or ``"fixed"``; ``bert_config``: a ``transformers.BertConfig``
    (default BERT-base); ``seed``: the weights' seed (the global random state is left untouched);
    ``detector_kwargs`` go to :class:`BottomUpC4Detector` (e.g. ``rpn_post_nms_top_n``).
    """

    def __init__(self, box_selection: str = "thresholded", *, bert_config=None, num_answers: int = VQA_ANSWERS,
                 seed: int = 0, **detector_kwargs):
        super().__init__()
        if box_selection not in BOX_SELECTIONS:
            raise ValueError(f"box_selection: expected one of {BOX_SELECTIONS}, got {box_selection!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.box_selection = box_selection
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the weights are drawn on the CPU; CUDA's generator is left alone
            self.detector = BottomUpC4Detector(**detector_kwargs)
            self.transformer = RegionTransformer(bert_config, self.detector.feature_dim, num_answers)

    def load_detector_weights(self, source) -> None:
        """Load a detector state dict (path or mapping); see :meth:`BottomUpC4Detector.load_weights`."""
        self.detector.load_weights(source)

    def backbone(self, images: Tensor) -> Tensor:
        return self.detector.backbone(images)

    def rpn(self, images: Tensor, res4: Tensor) -> List[Tensor]:
        return self.detector.propose(images, res4)

    def roi_heads(self, res4: Tensor, proposals: List[Tensor], image_size: Tuple[int, int]) -> List[RegionDetections]:
        return self.detector.detect(res4, proposals, image_size, self.box_selection)

    def bert(self, input_ids: Tensor, attention_mask: Tensor, detections: List[RegionDetections], image_size) -> Tensor:
        return self.transformer(input_ids, attention_mask, [d.features for d in detections],
                                [d.boxes for d in detections], image_size)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> RegionOutput:
        """``images`` ``[B, 3, H, W]`` (one size for the batch), ``input_ids`` and ``attention_mask`` ``[B, T]``.
        A test-time feature extractor: call ``.eval()`` first (torchvision's RPN wants targets in training)."""
        if self.training:
            raise RuntimeError("RegionPipeline extracts features at test time only: call .eval() first")
        # The text is checked before the detector's ResNet runs, the costly part.
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images: expected a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"input_ids: expected {images.shape[0]} rows like the images, got {input_ids.shape[0]}")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected the shape of input_ids {list(input_ids.shape)}, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask))}")
        res4 = self.backbone(images)
        image_size = tuple(images.shape[-2:])
        detections = self.roi_heads(res4, self.rpn(images, res4), image_size)
        return RegionOutput(self.bert(input_ids, attention_mask, detections, image_size), detections)
