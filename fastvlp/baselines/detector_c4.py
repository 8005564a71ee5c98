"""A bottom-up-attention-style Faster R-CNN, ResNet-101 C4, built from torchvision's detection parts.

The backbone is ResNet-101 up to ``layer3`` (res4, stride 16, 1024 channels); the RPN (12 anchors per
position) proposes boxes on res4; each proposal is pooled 14x14 by RoIAlign from res4, run through
``layer4`` (res5, stride 2 on the first block, so 7x7) and mean-pooled into a 2048-d feature; predictors
give 1601 class scores (background first), 1601 x 4 box deltas and, from the feature and an embedding of
the predicted class, 401 attribute scores (no-attribute first). Weights start random; nothing downloads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import clip_boxes_to_image, roi_align

from fastvlp.baselines.box_selection import per_class_max_confidence, select_boxes
from fastvlp.models.backbone import convolution_layout
from fastvlp.nn.frozen_batch_norm import FrozenBatchNorm2d

RES4_STRIDE = 16


@dataclass
class RegionDetections:
    """One image's kept RoIs, best first: ``boxes`` ``[N, 4]`` (the RoIs, x1 y1 x2 y2 in pixels, as
    bottom-up attention keeps them), ``features`` ``[N, 2048]``, ``confidence`` ``[N]`` (best class score
    surviving NMS), ``classes`` ``[N]`` (the most probable foreground class, 1..1600), ``class_boxes``
    ``[N, 4]`` (the box regressed for that class) and ``attribute_scores`` ``[N, num_attributes]``."""

    boxes: Tensor
    features: Tensor
    confidence: Tensor
    classes: Tensor
    class_boxes: Tensor
    attribute_scores: Tensor


class BottomUpC4Detector(nn.Module):
    """Faster R-CNN R101-C4 with bottom-up attention's heads and test settings (every threshold a keyword).

    Stages: :meth:`backbone` (to res4), :meth:`propose` (RPN with NMS), :meth:`detect` (RoIAlign, res5,
    predictors, per-class NMS and box selection).
    """

    def __init__(
        self,
        num_classes: int = 1601,
        num_attributes: int = 401,
        *,
        anchor_sizes: Sequence[int] = (64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_pre_nms_top_n: int = 6000,
        rpn_post_nms_top_n: int = 300,
        rpn_nms_thresh: float = 0.7,
        roi_output_size: int = 14,
        nms_thresh: float = 0.3,
        conf_thresh: float = 0.2,
        min_boxes: int = 10,
        max_boxes: int = 100,
        fixed_boxes: int = 36,
        class_embedding_dim: int = 256,
        attribute_hidden: int = 512,
    ):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_attributes", num_attributes),
                            ("rpn_pre_nms_top_n", rpn_pre_nms_top_n), ("rpn_post_nms_top_n", rpn_post_nms_top_n),
                            ("roi_output_size", roi_output_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2 (background and one class), got {num_classes}")
        for name, value in (("rpn_nms_thresh", rpn_nms_thresh), ("nms_thresh", nms_thresh), ("conf_thresh", conf_thresh)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        for name, value in (("min_boxes", min_boxes), ("max_boxes", max_boxes), ("fixed_boxes", fixed_boxes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
        if min_boxes > max_boxes:
            raise ValueError(f"min_boxes, max_boxes: expected min_boxes <= max_boxes, got {min_boxes} > {max_boxes}")
        # Without trained batch-norm statistics the activations grow about 1.5x per block (to ~1e4 by res4, where
        # the RPN then proposes nothing); zero-initialised residual branches keep random weights usable.
        resnet = torchvision.models.resnet101(weights=None, norm_layer=FrozenBatchNorm2d, zero_init_residual=True)
        self.res4 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                  resnet.layer1, resnet.layer2, resnet.layer3)
        self.res5 = resnet.layer4
        self.res4_channels, self.feature_dim = 1024, 2048
        anchors = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=(tuple(aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(self.res4_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms_top_n, testing=rpn_pre_nms_top_n),
            post_nms_top_n=dict(training=rpn_post_nms_top_n, testing=rpn_post_nms_top_n),
            nms_thresh=rpn_nms_thresh,
        )
        self.cls_score = nn.Linear(self.feature_dim, num_classes)
        self.bbox_pred = nn.Linear(self.feature_dim, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes, class_embedding_dim)
        self.attr_hidden = nn.Linear(self.feature_dim + class_embedding_dim, attribute_hidden)
        self.attr_score = nn.Linear(attribute_hidden, num_attributes)
        # Bottom-up's BBOX_NORMALIZE_STDS (0.1, 0.1, 0.2, 0.2) are these weights' inverses.
        self.box_coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
        self.num_classes, self.num_attributes = num_classes, num_attributes
        self.roi_output_size, self.nms_thresh = roi_output_size, nms_thresh
        self.selection = dict(threshold=conf_thresh, min_boxes=min_boxes, max_boxes=max_boxes, fixed_boxes=fixed_boxes)

    # ------------------------------------------------------------------ weights

    def load_weights(self, source: Union[str, Path, Mapping[str, Tensor]]) -> None:
        """Load a state dict of this module (a ``.pt``/``.pth`` path or a mapping), strictly. Raises
        ``ValueError`` listing the missing and unexpected keys, or the shapes that differ."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"source: no such detector weight file: {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
        elif isinstance(source, Mapping):
            state = source
        else:
            raise TypeError(f"source: expected a path or a state dict, got {type(source).__name__}")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"source: not a {type(self).__name__} state dict: {len(missing)} missing keys "
                             f"{missing[:10]}, {len(unexpected)} unexpected keys {unexpected[:10]}")
        shapes = [f"{key}: {list(state[key].shape)} for {list(own[key].shape)}"
                  for key in own if tuple(state[key].shape) != tuple(own[key].shape)]
        if shapes:
            raise ValueError(f"source: {len(shapes)} tensors have the wrong shape: {shapes[:10]}")
        self.load_state_dict(state, strict=True)

    # ------------------------------------------------------------------ stages

    def backbone(self, images: Tensor) -> Tensor:
        """``images`` ``[B, 3, H, W]`` -> res4 ``[B, 1024, H/16, W/16]``."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor [B, 3, H, W], got {getattr(images, 'shape', type(images))}")
        return self.res4(images.contiguous(memory_format=convolution_layout(images.device)))

    def propose(self, images: Tensor, res4: Tensor) -> List[Tensor]:
        """RPN proposals after NMS, at most ``rpn_post_nms_top_n`` ``[R, 4]`` boxes per image."""
        size = tuple(images.shape[-2:])
        proposals, _ = self.rpn(ImageList(images, [size] * images.shape[0]), {"res4": res4})
        return proposals

    def box_features(self, res4: Tensor, proposals: List[Tensor]) -> Tensor:
        """``[sum R, 2048]``: 14x14 RoIAlign from res4, res5, mean over the 7x7 map."""
        pooled = roi_align(res4, [boxes.to(res4.dtype) for boxes in proposals], self.roi_output_size,
                           spatial_scale=1.0 / RES4_STRIDE, sampling_ratio=0, aligned=True)
        return self.res5(pooled.contiguous(memory_format=convolution_layout(pooled.device))).mean(dim=(2, 3))

    def attribute_scores(self, features: Tensor, classes: Tensor) -> Tensor:
        """Attribute probabilities from each RoI's feature and an embedding of its predicted class."""
        joined = torch.cat((features, self.cls_embedding(classes).to(features.dtype)), dim=1)
        return F.softmax(self.attr_score(F.relu(self.attr_hidden(joined))).float(), dim=-1)

    def detect(self, res4: Tensor, proposals: List[Tensor], image_size: Tuple[int, int], mode: str = "thresholded") -> List[RegionDetections]:
        """The RoI heads: features and predictions of every proposal, per-class NMS over all classes,
        and the kept boxes of each image (``mode`` ``"thresholded"`` or ``"fixed"``)."""
        if len(proposals) != res4.shape[0]:
            raise ValueError(f"proposals: expected {res4.shape[0]} per-image box tensors, got {len(proposals)}")
        features = self.box_features(res4, proposals)
        class_probs = F.softmax(self.cls_score(features).float(), dim=-1)
        deltas = self.bbox_pred(features).float()
        rois = torch.cat(proposals).float()
        class_boxes = self.box_coder.decode_single(deltas, rois).reshape(-1, self.num_classes, 4)
        class_boxes = clip_boxes_to_image(class_boxes, image_size)
        predicted = class_probs[:, 1:].argmax(dim=1) + 1
        attributes = self.attribute_scores(features, predicted)
        results, start = [], 0
        for boxes in proposals:
            rows = slice(start, start + boxes.shape[0])
            start += boxes.shape[0]
            confidence = per_class_max_confidence(boxes, class_probs[rows, 1:], self.nms_thresh)
            keep = select_boxes(confidence, mode, **self.selection)
            results.append(RegionDetections(
                boxes=boxes[keep], features=features[rows][keep], confidence=confidence[keep],
                classes=predicted[rows][keep],
                class_boxes=class_boxes[rows][keep, predicted[rows][keep]],
                attribute_scores=attributes[rows][keep],
            ))
        return results
