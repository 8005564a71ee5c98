"""Does a model use the image? Teacher-forced caption loss with each image's own captions against the loss
with the images swapped, how far the caption decoder's cross-attention is from uniform, and how often the
encoder's MLM head restores masked words that only the image tells (colours, say) with the own images and
with swapped ones (``scripts/image_dependence.py`` runs all three on a checkpoint)."""
from typing import List, Sequence, Tuple

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


def masked_word_scores(model, images: Tensor, pixel_mask: Tensor, ids: Tensor, mask: Tensor,
                       word_ids: Sequence[int], mask_token_id: int) -> Tuple[float, float, int]:
    """How well the MLM head restores the tokens of ``ids`` whose id is in ``word_ids``, every one of them
    replaced by ``mask_token_id`` at once, over the joint encoding of text row i with image i: the top-1
    accuracy, the mean log-probability of the right token, and the number of tokens scored (both figures
    nan when there are none). ``ids`` ``[N, T]`` are ``[CLS] text [SEP]`` rows, ``mask`` True = real token."""
    if not len(word_ids):
        raise ValueError("word_ids: expected at least one token id to mask")
    targets = torch.isin(ids, torch.tensor(list(word_ids), dtype=ids.dtype, device=ids.device)) & mask
    scored = int(targets.sum())
    if not scored:
        return float("nan"), float("nan"), 0
    encoded = model.encode(images, pixel_mask, ids.masked_fill(targets, mask_token_id), mask)
    log_probs = model.mlm_logits(encoded)[targets].double().log_softmax(-1)  # [scored, vocab]
    right = ids[targets]
    accuracy = float((log_probs.argmax(-1) == right).double().mean())
    return accuracy, float(log_probs.gather(1, right[:, None]).mean()), scored
