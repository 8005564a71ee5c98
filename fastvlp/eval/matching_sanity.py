"""Can a model learn image-text matching at all when matching is trivially easy, and after how many steps?

Each image is one palette colour filling the frame, with a little pixel noise; each text is
"a <colour> shape", naming the image's colour in a matched pair and another palette colour in a mismatched
one (half the pairs). A model that compares the colour word with the image tokens ends at loss 0. The probe
trains only the ITM objective and reports the loss window by window, so the plateau at chance (ln 2) before
the model starts to compare shows, and how long it lasts for a given initialisation and batch order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastvlp.data.synth.palette import COLOURS
from fastvlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastvlp.eval.itm_ceiling import palette_tensor

COLOUR_NAMES = tuple(COLOURS)
IMAGE_SIZE = (96, 128)
PIXEL_NOISE = 0.02


def matching_text(colour: str) -> str:
    return f"a {colour} shape"


@dataclass
class SolidColourBatch:
    images: Tensor  # [B, 3, H, W], ImageNet-normalised
    pixel_mask: Tensor  # [B, H, W], all False (no padding)
    colours: Tensor  # [B] palette index of each image
    named: Tensor  # [B] palette index each text names
    labels: Tensor  # [B] 1 = matched, 0 = mismatched
    texts: List[str]


def solid_colour_batch(batch_size: int, generator: torch.Generator, image_size: Sequence[int] = IMAGE_SIZE,
                       pixel_noise: float = PIXEL_NOISE) -> SolidColourBatch:
    """``batch_size`` solid-colour images with their texts, drawn from ``generator``: each pair matched with
    probability one half, a mismatched text naming a uniformly drawn other colour."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if pixel_noise < 0:
        raise ValueError(f"pixel_noise: expected >= 0, got {pixel_noise!r}")
    height, width = image_size
    count = len(COLOUR_NAMES)
    colours = torch.randint(count, (batch_size,), generator=generator)
    labels = (torch.rand(batch_size, generator=generator) < 0.5).long()
    others = (colours + torch.randint(1, count, (batch_size,), generator=generator)) % count
    named = torch.where(labels == 1, colours, others)
    palette = palette_tensor()  # rows in COLOUR_NAMES order
    pixels = palette[colours][:, :, None, None].expand(batch_size, 3, height, width)
    pixels = pixels + pixel_noise * torch.randn(pixels.shape, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return SolidColourBatch(
        images=(pixels - mean) / std,
        pixel_mask=torch.zeros(batch_size, height, width, dtype=torch.bool),
        colours=colours, named=named, labels=labels,
        texts=[matching_text(COLOUR_NAMES[i]) for i in named.tolist()],
    )


def train_matching(model, tokenizer, steps: int, batch_size: int = 8, data_seed: int = 0,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> List[float]:
    """Train ``model`` (an E2EVLP) on the ITM loss alone over ``steps`` solid-colour batches drawn with
    ``data_seed``, at the config's constant learning rate (no warm-up) with its gradient clipping; returns
    each step's loss."""
    from fastvlp.train.optim import build_optimizer

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    optimizer = optimizer or build_optimizer(model)
    generator = torch.Generator().manual_seed(data_seed)
    model.train()
    losses = []
    for _ in range(steps):
        batch = solid_colour_batch(batch_size, generator)
        encoded_text = tokenizer.encode_batch(batch.texts)
        encoded = model.encode(batch.images, batch.pixel_mask, encoded_text.input_ids, encoded_text.attention_mask)
        loss = F.cross_entropy(model.itm_logits(encoded).float(), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.clip_max_norm)
        optimizer.step()
        losses.append(loss.item())
    return losses


def window_means(losses: Sequence[float], window: int) -> List[float]:
    """The mean of each full window of ``window`` consecutive losses."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    return [sum(losses[i:i + window]) / window for i in range(0, len(losses) - window + 1, window)]


def first_window_below(losses: Sequence[float], threshold: float, window: int) -> Optional[int]:
    """The last step (1-based) of the first full window whose mean loss is below ``threshold``; None when
    no window is."""
    for index, mean in enumerate(window_means(losses, window)):
        if mean < threshold:
            return (index + 1) * window
    return None
