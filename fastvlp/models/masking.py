"""BERT's masked-language-model corruption: 15% of the real, non-special tokens are chosen; of those 80%
become [MASK], 10% a random token and 10% stay as they are; the loss reads only the chosen ones."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index


def _uniform(shape, generator: Optional[torch.Generator], device) -> Tensor:
    source_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source_device).to(device)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    special_token_ids: Iterable[int],
    mask_token_id: int,
    vocab_size: int,
    generator: Optional[torch.Generator] = None,
    probability: float = 0.15,
) -> Tuple[Tensor, Tensor]:
    """Corrupt ``input_ids`` ``[B, T]`` for MLM.

    Args:
        attention_mask: bool ``[B, T]``, True = real token (padding is never chosen).
        special_token_ids: ids never chosen ([CLS], [SEP], [PAD], [MASK], ...); random replacements
            are drawn from the other ids.
        mask_token_id: the [MASK] id.
        vocab_size: ids are in ``[0, vocab_size)``.
        generator: the source of randomness (its device is where the draws happen).
        probability: the share of eligible tokens chosen (0.15).

    Returns:
        ``(masked_ids, labels)``: the corrupted ids (a new tensor), and ``labels`` ``[B, T]`` holding the
        original id at chosen positions and -100 elsewhere.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids: expected an integer tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}")
    if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected a bool tensor of shape {list(input_ids.shape)} (True = real token)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    special = sorted({int(i) for i in special_token_ids})
    if any(not 0 <= i < vocab_size for i in special + [mask_token_id]):
        raise ValueError(f"special_token_ids and mask_token_id: expected ids in [0, {vocab_size}), got {special} and {mask_token_id}")
    if mask_token_id not in special:
        special.append(mask_token_id)
    if not isinstance(probability, (int, float)) or isinstance(probability, bool) or not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability: expected a number in [0, 1], got {probability!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")

    device = input_ids.device
    special_tensor = torch.tensor(special, dtype=input_ids.dtype, device=device)
    eligible = attention_mask & ~torch.isin(input_ids, special_tensor)
    chosen = eligible & (_uniform(input_ids.shape, generator, device) < probability)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    action = _uniform(input_ids.shape, generator, device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special] = False
    candidates = allowed.nonzero().flatten().to(device=device, dtype=input_ids.dtype)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    if candidates.numel():
        pick = (_uniform(input_ids.shape, generator, device) * candidates.numel()).long().clamp(max=candidates.numel() - 1)
        masked = torch.where(to_random, candidates[pick], masked)
    return masked, labels
