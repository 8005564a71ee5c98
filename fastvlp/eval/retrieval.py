"""Image-text retrieval recall (R@1/5/10) from a full ``[num_images, num_texts]`` score matrix.

Text retrieval (``txt_r*``): each image queries every caption; a hit when any of its own captions ranks
within K. Image retrieval (``img_r*``): each caption queries every image; a hit when its image ranks
within K. ``r_mean`` is the mean of the six. Values are fractions in [0, 1].

A target's rank counts the other candidates that score at least as high as it: ties are broken against
the target (a pessimistic rule), so a scorer gains nothing from ties: a constant one hits only when all the
candidates fit within K. For text retrieval the target is the image's highest-scoring own caption and the
other candidates are the captions of other images (its own captions never count against it).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)
_ROW_BLOCK = 1024


def _check_scores(scores: Tensor, text_to_image: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores: expected a float tensor [num_images, num_texts], got {getattr(scores, 'shape', type(scores))}")
    if torch.isnan(scores).any():
        raise ValueError("scores: expected no NaN")
    if not isinstance(text_to_image, Tensor) or text_to_image.dtype not in (torch.int32, torch.int64):
        raise TypeError("text_to_image: expected an integer tensor [num_texts]")
    if text_to_image.shape != (scores.shape[1],):
        raise ValueError(f"text_to_image: expected shape [{scores.shape[1]}], got {list(text_to_image.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError("scores: expected at least one image and one text")
    if text_to_image.min() < 0 or text_to_image.max() >= scores.shape[0]:
        raise ValueError(f"text_to_image: expected image indices in [0, {scores.shape[0]})")


def retrieval_ranks(scores: Tensor, text_to_image: Tensor) -> Dict[str, Tensor]:
    """0-based ranks, ties counted against the target (module docstring): ``image_rank`` ``[num_texts]``,
    the number of other images that score each caption at least as high as its own image does, and
    ``text_rank`` ``[num_images]``, the number of other images' captions that score at least as high as
    the image's best own caption (``num_texts`` for an image without captions, which then never counts
    as a hit)."""
    _check_scores(scores, text_to_image)
    text_to_image = text_to_image.to(device=scores.device, dtype=torch.int64)
    num_images, num_texts = scores.shape
    target = scores[text_to_image, torch.arange(num_texts, device=scores.device)]  # each caption with its own image
    # An image's best-ranked own caption is its highest-scoring one.
    best_own = torch.full((num_images,), -torch.inf, dtype=scores.dtype, device=scores.device)
    best_own = best_own.scatter_reduce(0, text_to_image, target, reduce="amax")
    image_rank = torch.zeros(num_texts, dtype=torch.int64, device=scores.device)
    text_rank = torch.empty(num_images, dtype=torch.int64, device=scores.device)
    # Row blocks bound the temporary comparison matrix (5k x 25k for COCO's test split).
    for start in range(0, num_images, _ROW_BLOCK):
        block = scores[start : start + _ROW_BLOCK]
        rows = torch.arange(start, start + block.shape[0], device=scores.device)
        # A pair of the block is a competitor when its image and caption do not belong together.
        other = rows[:, None] != text_to_image[None, :]
        image_rank += ((block >= target[None, :]) & other).sum(0)
        text_rank[start : start + _ROW_BLOCK] = ((block >= best_own[start : start + _ROW_BLOCK, None]) & other).sum(1)
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=scores.device)
    has_caption[text_to_image] = True
    text_rank[~has_caption] = num_texts
    return {"image_rank": image_rank, "text_rank": text_rank}


def retrieval_recall(scores: Tensor, text_to_image: Tensor, ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """``txt_r{k}``, ``img_r{k}`` for each k in ``ks`` and ``r_mean``; see the module docstring.

    ``scores`` ``[num_images, num_texts]`` (higher = more similar); ``text_to_image`` ``[num_texts]``, the
    image index of each caption. Images without any caption are excluded from text retrieval."""
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive ints, got {ks!r}")
    ranks = retrieval_ranks(scores, text_to_image)
    has_caption = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    has_caption[text_to_image.to(scores.device, torch.int64)] = True
    text_rank = ranks["text_rank"][has_caption]
    result: Dict[str, float] = {}
    for k in ks:
        result[f"txt_r{k}"] = (text_rank < k).double().mean().item()
    for k in ks:
        result[f"img_r{k}"] = (ranks["image_rank"] < k).double().mean().item()
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def fill_score_matrix(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    num_images: int,
    num_texts: int,
    *,
    image_batch_size: int = 32,
    text_batch_size: int = 128,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``[num_images, num_texts]`` matrix of ``score_fn(image_indices, text_indices)``, which takes two
    int64 index tensors and returns ``[len(image_indices), len(text_indices)]`` scores, called block by
    block (e.g. an ITM head over every image-text pair, batched)."""
    if not callable(score_fn):
        raise TypeError("score_fn: expected a callable (image_indices, text_indices) -> [b_i, b_t] scores")
    for name, value in (("num_images", num_images), ("num_texts", num_texts), ("image_batch_size", image_batch_size), ("text_batch_size", text_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name.startswith("num") else 1):
            raise ValueError(f"{name}: expected a {'non-negative' if name.startswith('num') else 'positive'} int, got {value!r}")
    scores = torch.empty((num_images, num_texts), dtype=dtype, device=device)
    for image_start in range(0, num_images, image_batch_size):
        images = torch.arange(image_start, min(image_start + image_batch_size, num_images), device=device)
        for text_start in range(0, num_texts, text_batch_size):
            texts = torch.arange(text_start, min(text_start + text_batch_size, num_texts), device=device)
            block = score_fn(images, texts)
            if not isinstance(block, Tensor) or block.shape != (len(images), len(texts)):
                raise ValueError(
                    f"score_fn: expected a tensor [{len(images)}, {len(texts)}], got {getattr(block, 'shape', type(block))}"
                )
            scores[images[0] : images[-1] + 1, texts[0] : texts[-1] + 1] = block.to(dtype)
    return scores
