"""A one-to-many detection head on the encoder's image tokens, trained beside DETR's set loss.

Co-DETR (Zong et al., ICCV 2023) trains auxiliary dense heads on the encoder output because DETR's
one-to-one matching gives the encoder very few positive examples a step: an image with five objects
trains five queries, and the image tokens under those objects get their gradient only through the
decoder's cross-attention. Here every image token whose centre lies inside an object (the smallest such
object, as FCOS assigns), and for an object that holds no token's centre the token nearest its centre
(so that an object smaller than a token still gets one), predicts that object's class and box, with a
sigmoid focal loss over all the image's tokens and L1 and GIoU losses on the positive ones. Inference
reads the decoder's queries as before; with ``two_stage`` (Deformable DETR's two-stage queries) the
head's best-scored token boxes are where those queries start.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from fastvlp.models.heads import MLP
from fastvlp.nn.matched_pairs import PaddedTargets
from fastvlp.ops.boxes import box_cxcywh_to_xyxy

# The losses' weights, Deformable DETR's for focal class, L1 and GIoU terms.
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 2.0, 5.0, 2.0


def token_centres(padding_mask: Tensor) -> Tensor:
    """``padding_mask`` ``[B, H, W]`` (True = padding) -> ``[B, H, W, 2]`` the normalised (x, y) centre of
    each token over its image's unpadded extent, as the sine position encoding normalises it: the image
    occupies the top-left of the padded canvas, and a padded token's centre lies outside ``[0, 1]``."""
    valid = (~padding_mask).float()
    rows = valid[:, :, :1].sum(1, keepdim=True).clamp(min=1)  # [B, 1, 1]: the image's rows
    cols = valid[:, :1, :].sum(2, keepdim=True).clamp(min=1)
    height, width = padding_mask.shape[1:]
    y = (torch.arange(height, device=padding_mask.device, dtype=torch.float32)[None, :, None] + 0.5) / rows
    x = (torch.arange(width, device=padding_mask.device, dtype=torch.float32)[None, None, :] + 0.5) / cols
    return torch.stack(torch.broadcast_tensors(x, y), dim=-1)


def assign_tokens(centres: Tensor, valid: Tensor, boxes: Tensor) -> Tensor:
    """The object each token learns: ``centres`` ``[N, 2]`` normalised (x, y), ``valid`` ``[N]`` bool,
    ``boxes`` ``[M, 4]`` normalised (cx, cy, w, h) -> ``[N]`` int64, the index of the smallest box whose
    interior holds the token's centre; an object whose interior holds no valid token's centre takes its
    nearest valid token instead; -1 for a background token."""
    assigned = torch.full((centres.shape[0],), -1, dtype=torch.int64, device=centres.device)
    if boxes.shape[0] == 0 or not bool(valid.any()):
        return assigned
    corners = box_cxcywh_to_xyxy(boxes.float())
    x, y = centres[:, 0:1], centres[:, 1:2]
    inside = (x > corners[:, 0]) & (x < corners[:, 2]) & (y > corners[:, 1]) & (y < corners[:, 3]) & valid[:, None]
    area = (boxes[:, 2] * boxes[:, 3]).float()
    area_if_inside = torch.where(inside, area[None], torch.full_like(inside, float("inf"), dtype=area.dtype))
    smallest, index = area_if_inside.min(dim=1)
    assigned = torch.where(torch.isfinite(smallest), index, assigned)
    # an object that holds no token's centre (smaller than a token) takes its nearest valid token
    has_token = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    has_token[assigned[assigned >= 0]] = True
    if not bool(has_token.all()):
        distance = torch.cdist(boxes[:, :2].float(), centres.float())  # [M, N]
        nearest = distance.masked_fill(~valid[None], float("inf")).argmin(dim=1)
        # larger objects first, so that where two share a nearest token the smaller one keeps it
        for obj in torch.argsort(area, descending=True).tolist():
            if not has_token[obj]:
                assigned[nearest[obj]] = obj
    return assigned


def per_image_targets(targets: Union[Sequence[Mapping[str, Any]], PaddedTargets]) -> Sequence[Mapping[str, Any]]:
    """DETR's per-image dicts of ``labels`` and ``boxes``, from themselves or from :class:`PaddedTargets`
    (whose counts are read on the host when the batch does not carry them there)."""
    if not isinstance(targets, PaddedTargets):
        return targets
    sizes = targets.sizes if targets.sizes is not None else targets.counts.tolist()
    return [{"labels": targets.labels[row, :count], "boxes": targets.boxes[row, :count]}
            for row, count in enumerate(sizes)]


class TokenDetectionHead(nn.Module):
    """Class logits (one sigmoid per class, no background column) and a box for every image token. The
    box is a 3-layer MLP's offset, in logit space, from a reference box at the token's centre two tokens
    wide and high; the last layer starts at zero, so each token first predicts its reference box."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.class_embed = nn.Linear(d_model, num_classes)
        self.box_embed = MLP(d_model, d_model, 4, 3)
        # focal loss's prior: every class starts at probability 0.01, so background dominates no early step
        nn.init.constant_(self.class_embed.bias, -4.595)
        nn.init.zeros_(self.box_embed.layers[-1].weight)
        nn.init.zeros_(self.box_embed.layers[-1].bias)

    def forward(self, tokens: Tensor, centres: Tensor, grid: Sequence[int]) -> Dict[str, Tensor]:
        """``tokens`` ``[B, N, d]``, ``centres`` ``[B, N, 2]``, ``grid`` the ``(H, W)`` of the N = H * W
        tokens -> ``logits`` ``[B, N, C]`` and ``boxes`` ``[B, N, 4]`` normalised (cx, cy, w, h)."""
        height, width = grid
        size = centres.new_tensor([2.0 / width, 2.0 / height]).clamp(max=0.5).expand_as(centres)
        reference = torch.cat((centres.clamp(1e-3, 1 - 1e-3), size), dim=-1)
        offsets = self.box_embed(tokens)
        boxes = (offsets.float() + torch.logit(reference)).sigmoid()
        return {"logits": self.class_embed(tokens), "boxes": boxes}


def token_detection_losses(logits: Tensor, boxes: Tensor, centres: Tensor, valid: Tensor,
                           targets: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """``loss_token_ce`` (sigmoid focal over every valid token, per positive token), ``loss_token_bbox``
    (L1 of the (cx, cy, w, h) boxes) and ``loss_token_giou`` (both per positive token), and their weighted
    sum ``loss_token``. ``logits`` ``[B, N, C]``, ``boxes`` ``[B, N, 4]``, ``centres`` ``[B, N, 2]``,
    ``valid`` ``[B, N]`` bool; ``targets`` DETR's per-image dicts of ``labels`` and ``boxes``."""
    if len(targets) != logits.shape[0]:
        raise ValueError(f"targets: expected {logits.shape[0]} (one per image), got {len(targets)}")
    class_targets = torch.zeros_like(logits, dtype=torch.float32)
    matched_pred: List[Tensor] = []
    matched_true: List[Tensor] = []
    for row, target in enumerate(targets):
        assigned = assign_tokens(centres[row], valid[row], target["boxes"])
        positive = assigned >= 0
        tokens = positive.nonzero().flatten()
        objects = assigned[tokens]
        class_targets[row, tokens, target["labels"][objects]] = 1.0
        matched_pred.append(boxes[row, tokens])
        matched_true.append(target["boxes"][objects].float())
    pred, true = torch.cat(matched_pred), torch.cat(matched_true)
    num_positive = max(pred.shape[0], 1)
    focal = sigmoid_focal_loss(logits.float(), class_targets, alpha=0.25, gamma=2.0, reduction="none")
    loss_ce = (focal.sum(-1) * valid).sum() / num_positive
    loss_bbox = F.l1_loss(pred, true, reduction="sum") / num_positive
    if pred.shape[0]:
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(true), reduction="sum") / num_positive
    else:
        loss_giou = boxes.sum() * 0.0
    total = CLASS_WEIGHT * loss_ce + L1_WEIGHT * loss_bbox + GIOU_WEIGHT * loss_giou
    return {"loss_token": total, "loss_token_ce": loss_ce, "loss_token_bbox": loss_bbox, "loss_token_giou": loss_giou}
