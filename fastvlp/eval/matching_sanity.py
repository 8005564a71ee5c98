"""Can a model learn image-text matching at all when matching is trivially easy, and after how many steps?

Each image is one palette colour filling the frame, with a little pixel noise; each text is
"a <colour> shape", naming the image's colour in a matched pair and another palette colour in a mismatched
one (half the pairs). A model that compares the colour word with the image tokens ends at loss 0. The probe
trains only the ITM objective and reports the loss window by window, so the plateau at chance (ln 2) before
the model starts to compare shows, and how long it lasts for a given initialisation and batch order.

:func:`match_variance` shows why the plateau is long: it splits the encoder's states over every
(image colour, named colour) pair into what depends on the image, on the text, and on the two together,
and measures how much of the last is whether they match, the one thing the ITM head must read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

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


def _normalised(pixels: Tensor) -> Tensor:
    """RGB in 0..1 ``[B, 3, H, W]``, normalised as the models' transforms normalise images."""
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


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
    return SolidColourBatch(
        images=_normalised(pixels),
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


def variance_components(states: Tensor) -> Dict[str, float]:
    """Two-way split of hidden states ``[n, n, d]`` indexed by (image colour, named colour), each part's
    mean squared size over the ``n * n`` cells as a fraction of the states' mean squared norm.

    ``total``: the states' spread around their mean, the sum of ``image`` and ``text`` (the means over
    the other index, centred) and ``interaction`` (what is left: every effect of the pair as a whole).
    ``match``, a part of ``interaction``: its projection on the indicator of the two colours being the
    same, the signal that tells matched from mismatched pairs."""
    if not isinstance(states, Tensor) or states.dim() != 3 or states.shape[0] != states.shape[1] or states.shape[0] < 2:
        raise ValueError(f"states: expected a tensor [n, n, d] with n >= 2, got {getattr(states, 'shape', type(states))}")
    states = states.double()
    n = states.shape[0]
    grand = states.mean((0, 1))
    by_image, by_text = states.mean(1, keepdim=True), states.mean(0, keepdim=True)
    residual = states - by_image - by_text + grand

    def size(x: Tensor) -> float:
        return float(x.pow(2).sum(-1).mean())

    norm = size(states)
    if norm == 0:
        raise ValueError("states: all zero, nothing to split")
    # The double-centred indicator is delta - 1/n, whose squares sum to n - 1; projecting the residual
    # (whose rows and columns sum to zero) on it leaves a part of mean squared size |mean diagonal|^2 / (n - 1).
    diagonal_mean = residual.diagonal(dim1=0, dim2=1).mean(-1)
    parts = {
        "total": size(states - grand),
        "image": size(by_image - grand),
        "text": size(by_text - grand),
        "interaction": size(residual),
        "match": float(diagonal_mean.pow(2).sum()) / (n - 1),
    }
    return {name: value / norm for name, value in parts.items()}


@torch.no_grad()
def match_variance(model, tokenizer, image_size: Sequence[int] = IMAGE_SIZE) -> Dict[str, Dict[str, float]]:
    """Every (image colour, named colour) pair once, noise-free, through ``model``'s encoder (an E2EVLP, in
    eval mode for the call): :func:`variance_components` of the last layer's [CLS] vector, which the ITM
    head reads, and of the colour word's vector."""
    count = len(COLOUR_NAMES)
    height, width = image_size
    images = _normalised(palette_tensor()[:, :, None, None].expand(count, 3, height, width))
    image_index = torch.arange(count).repeat_interleave(count)
    text_index = torch.arange(count).repeat(count)
    encoded_text = tokenizer.encode_batch([matching_text(COLOUR_NAMES[i]) for i in text_index.tolist()])
    varying = (encoded_text.input_ids != encoded_text.input_ids[:1]).any(0).nonzero().flatten()
    if varying.numel() != 1:
        raise ValueError("tokenizer: expected each colour name to be one token of the probe's texts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        encoded = model.encode(images[image_index].to(device), torch.zeros(count * count, height, width, dtype=torch.bool, device=device),
                               encoded_text.input_ids.to(device), encoded_text.attention_mask.to(device))
    finally:
        model.train(was_training)
    cls = encoded.cls_hidden.float().cpu().view(count, count, -1)
    word = encoded.text_hidden[:, int(varying)].float().cpu().view(count, count, -1)
    return {"cls": variance_components(cls), "colour_word": variance_components(word)}
