"""Image-text contrastive alignment (ITC) on unimodal encoder passes, trained beside a cross-encoder.

A cross-encoder's [CLS] score has to learn a conjunction: whether what the text says agrees with what the
image shows. Neither side alone says anything about the label, so from random weights every first-order
gradient of a matching loss is zero in expectation and learning sits on a plateau (docs/learning.md).
ALBEF (Li et al., NeurIPS 2021) aligns the unimodal representations before fusing them: the text's [CLS]
from a text-only pass and the image from an image-only pass are projected into one space and trained with
an in-batch softmax over their cosine similarities, as CLIP does. That score is bilinear in the two
sides, so its gradient is their label-weighted cross-covariance, which is non-zero from the first step.
Here both passes go through the model's one shared encoder, and the image side is the mean of its tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# CLIP's starting temperature and its cap on the learned logit scale.
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def masked_mean(tokens: Tensor, padding_mask: Tensor) -> Tensor:
    """``tokens`` ``[B, S, d]``, ``padding_mask`` bool ``[B, S]`` (True = padding) -> ``[B, d]``, the mean
    over each row's unpadded tokens (0 for a row that is all padding)."""
    if tokens.dim() != 3 or padding_mask.shape != tokens.shape[:2]:
        raise ValueError(f"padding_mask: expected shape {list(tokens.shape[:2])} (tokens' [B, S]), "
                         f"got {list(padding_mask.shape)}")
    keep = (~padding_mask).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)


class ContrastiveHead(nn.Module):
    """Projections of a text's [CLS] vector and an image's pooled tokens into a shared ``dim``-dimensional
    space, unit-normalised, and the learned logit scale (1 / temperature) of their similarities."""

    def __init__(self, d_model: int, dim: int) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.d_model, self.dim = d_model, dim
        self.text_projection = nn.Linear(d_model, dim)
        self.image_projection = nn.Linear(d_model, dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INITIAL_TEMPERATURE)))

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, text_cls: Tensor, image_pooled: Tensor) -> Tuple[Tensor, Tensor]:
        """``text_cls`` ``[B, d_model]``, ``image_pooled`` ``[N, d_model]`` -> unit vectors ``[B, dim]`` and
        ``[N, dim]`` (float32 or wider)."""
        for name, x in (("text_cls", text_cls), ("image_pooled", image_pooled)):
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
                raise ValueError(f"{name}: expected a [rows, {self.d_model}] tensor, got {getattr(x, 'shape', type(x))}")
        text = self.text_projection(text_cls)
        image = self.image_projection(image_pooled)
        dtype = torch.promote_types(text.dtype, torch.float32)
        return F.normalize(text.to(dtype), dim=-1), F.normalize(image.to(dtype), dim=-1)


def contrastive_loss(image_embeddings: Tensor, text_embeddings: Tensor, logit_scale: Tensor,
                     image_ids: Optional[Tensor] = None) -> Tensor:
    """The symmetric in-batch contrastive loss of ``B`` matched (image, text) pairs.

    ``image_embeddings``, ``text_embeddings`` ``[B, D]`` (row ``i`` of each is a pair) and ``logit_scale``
    (a scalar tensor) give logits ``scale * image @ text.T``; the loss is the mean of the cross-entropy of
    each image over the texts and of each text over the images, the target being the diagonal.
    ``image_ids`` ``[B]`` (optional): rows holding the same image (a batch can repeat one) are not each
    other's negatives, their off-diagonal logits being left out. Returns 0 (attached to the graph) for
    ``B = 0``.
    """
    if image_embeddings.dim() != 2 or text_embeddings.shape != image_embeddings.shape:
        raise ValueError(f"text_embeddings: expected the shape of image_embeddings {list(image_embeddings.shape)}, "
                         f"got {list(text_embeddings.shape)}")
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1:
        raise ValueError("logit_scale: expected a one-element tensor")
    size = image_embeddings.shape[0]
    if size == 0:
        return (image_embeddings.sum() + text_embeddings.sum()) * 0 + logit_scale.sum() * 0
    logits = logit_scale.reshape(()) * image_embeddings @ text_embeddings.t()
    if image_ids is not None:
        if not isinstance(image_ids, Tensor) or image_ids.shape != (size,):
            raise ValueError(f"image_ids: expected a tensor [{size}], got {getattr(image_ids, 'shape', type(image_ids))}")
        ids = image_ids.to(logits.device)
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(size, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, -math.inf)
    target = torch.arange(size, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
