"""Does a caption decoder use the image? Teacher-forced caption loss with each image's own captions against
the loss with the images swapped, and how far the decoder's cross-attention is from uniform
(``scripts/image_dependence.py`` runs both on a checkpoint)."""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def swap_rows(captions_per_image: Sequence[int]) -> Tensor:
    """For rows laid out image by image (``captions_per_image[i]`` rows for image i), the row of the next
    image's first caption, the last image wrapping to the first: index the images with it to swap them."""
    counts = [int(c) for c in captions_per_image]
    if len(counts) < 2 or any(c < 1 for c in counts):
        raise ValueError(f"captions_per_image: expected at least two images with a caption each, got {counts}")
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    first = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)
    return first[(owner + 1) % len(counts)]


def caption_loss(model, images: Tensor, pixel_mask: Tensor, ids: Tensor, mask: Tensor) -> float:
    """Mean token cross-entropy of the captions ``ids`` (``mask`` True = real token), teacher-forced over an
    image-only encoder pass of ``images``: row i of the captions is scored against image i."""
    encoded = model.encode_image_only(images, pixel_mask)
    logits = model.caption_logits(encoded, ids[:, :-1], mask[:, :-1])
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100))


def cross_attention_entropy(model, images: Tensor, pixel_mask: Tensor, ids: Tensor, mask: Tensor) -> List[float]:
    """Per decoder layer: mean over caption tokens, heads and images of the attention entropy over the
    real image tokens, divided by log(number of real image tokens)."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((module, args, kwargs))

    hooks = [layer.multihead_attn.register_forward_hook(record, with_kwargs=True) for layer in model.decoder.layers]
    try:
        encoded = model.encode_image_only(images, pixel_mask)
        model.caption_logits(encoded, ids[:, :-1], mask[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    entropies = []
    for module, args, kwargs in calls:
        query, key, value = args[:3]
        padding = kwargs["key_padding_mask"]
        weights = module(query, key, value, key_padding_mask=padding, need_weights=True, average_attn_weights=False)[1]
        entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1)  # [B, heads, T]
        real_tokens = (~padding).sum(-1).clamp_min(2).double()
        normalised = entropy.double() / real_tokens.log()[:, None, None]
        token_mask = mask[:, :-1][:, None, :].expand_as(normalised)
        entropies.append(float(normalised[token_mask].mean()))
    return entropies
