"""How fast could image-text matching be learnt on the synthetic data by a model that perceives every
scene exactly? A reference for the pre-training ITM loss, which must learn perception and comparison
together from pixels.

The reference matcher is a small MLP over exact features of the pair it is given (the same pairs,
mismatches and MLM masking as pre-training):

* scene features: which palette colours are present, how many objects of each shape there are (one-hot,
  0 to ``MAX_COUNT`` and more), which (colour, shape) pairs occur, and the background's tint (one-hot).
  Shapes come from the detection targets' labels; each object's colour is the palette colour that covers
  most of its box's pixels; the tint is the one nearest to the median of the image's outermost pixels;
* text features: which vocabulary tokens the text holds, and which "colour shape" phrases (singular or
  plural) it contains.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from fastvlp.data.synth.palette import BACKGROUNDS, COLOURS, SHAPES

MAX_COUNT = 4
# RGB distance (0..1 a channel) under which a pixel counts as a palette colour after JPEG and resizing.
COLOUR_TOLERANCE = 0.15


def palette_tensor() -> Tensor:
    """``[colours, 3]`` palette RGB in 0..1, in ``COLOURS`` order."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255


def tint_tensor() -> Tensor:
    """``[tints, 3]`` background tints' RGB in 0..1, in ``BACKGROUNDS`` order."""
    return torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255


def object_colours(pixels: Tensor, boxes: Tensor) -> Tensor:
    """Palette index of each box's dominant colour (-1 where no pixel of the box is near a palette colour).

    ``pixels``: one image ``[3, H, W]`` in 0..1; ``boxes``: ``[N, 4]`` normalised (cx, cy, w, h)."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"pixels: expected a [3, H, W] tensor, got {getattr(pixels, 'shape', type(pixels))}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes: expected an [N, 4] tensor, got {getattr(boxes, 'shape', type(boxes))}")
    height, width = pixels.shape[1:]
    distance = (pixels[None] - palette_tensor()[:, :, None, None]).norm(dim=1)  # [colours, H, W]
    near = distance < COLOUR_TOLERANCE
    colours = []
    for cx, cy, w, h in boxes.tolist():
        x0, x1 = int((cx - w / 2) * width), int(round((cx + w / 2) * width))
        y0, y1 = int((cy - h / 2) * height), int(round((cy + h / 2) * height))
        counts = near[:, max(y0, 0):y1, max(x0, 0):x1].sum(dim=(1, 2))
        colours.append(int(counts.argmax()) if int(counts.max()) > 0 else -1)
    return torch.tensor(colours, dtype=torch.int64)


def scene_features(targets: Sequence[Dict[str, Tensor]], pixels: Tensor, pixel_mask: Tensor,
                   class_names: Sequence[str]) -> Tensor:
    """``[B, colours + shapes * (MAX_COUNT + 1) + colours * shapes + tints]`` exact scene features (see the module
    docstring). ``targets``: detection targets with ``labels`` and ``boxes`` normalised to each image's own
    size (None for an image without annotations); ``pixels``: ``[B, 3, H, W]`` in 0..1, padded at the bottom
    and right where ``pixel_mask`` ``[B, H, W]`` is True; ``class_names``: the label space's names."""
    if len(targets) != pixels.shape[0]:
        raise ValueError(f"targets: expected {pixels.shape[0]} targets like the images, got {len(targets)}")
    if pixel_mask.shape != (pixels.shape[0], *pixels.shape[2:]):
        raise ValueError(f"pixel_mask: expected shape {[pixels.shape[0], *pixels.shape[2:]]}, got {list(pixel_mask.shape)}")
    shape_of_class = {i: SHAPES.index(name) for i, name in enumerate(class_names) if name in SHAPES}
    num_colours, num_shapes = len(COLOURS), len(SHAPES)
    tints = tint_tensor().to(pixels.dtype)
    rows = []
    for target, image, mask in zip(targets, pixels, pixel_mask):
        image = image[:, : int((~mask[:, 0]).sum()), : int((~mask[0]).sum())]  # the image's own extent
        colour_present = torch.zeros(num_colours)
        counts = torch.zeros(num_shapes, dtype=torch.int64)
        pairs = torch.zeros(num_colours, num_shapes)
        if target is not None and len(target["labels"]):
            colours = object_colours(image, target["boxes"])
            for label, colour in zip(target["labels"].tolist(), colours.tolist()):
                shape = shape_of_class.get(label)
                if colour >= 0:
                    colour_present[colour] = 1
                if shape is not None:
                    counts[shape] += 1
                    if colour >= 0:
                        pairs[colour, shape] = 1
        count_one_hot = torch.nn.functional.one_hot(counts.clamp(max=MAX_COUNT), MAX_COUNT + 1).float().flatten()
        rows.append(torch.cat((colour_present, count_one_hot, pairs.flatten(), background_tint(image, tints))))
    return torch.stack(rows)


def background_tint(image: Tensor, tints: Tensor) -> Tensor:
    """One-hot ``[tints]``: the tint nearest to the median colour of ``image``'s (``[3, H, W]``, 0..1)
    outermost ring of pixels, which the synthetic scenes keep clear of shapes."""
    ring = torch.cat((image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]), dim=1)
    nearest = (ring.median(dim=1).values[None] - tints).norm(dim=1).argmin()
    return torch.nn.functional.one_hot(nearest, len(tints)).to(image.dtype)


def phrase_token_ids(encode) -> List[List[int]]:
    """Token ids of every "colour shape" and "colour shapes" phrase, ``encode`` mapping a phrase to its ids
    without special tokens; ``2 * colours * shapes`` lists, singular then plural for each pair."""
    return [encode(f"{colour} {shape}{plural}") for colour in COLOURS for shape in SHAPES for plural in ("", "s")]


def _contains(row: List[int], phrase: List[int]) -> bool:
    n = len(phrase)
    return any(row[i:i + n] == phrase for i in range(len(row) - n + 1))


def text_features(input_ids: Tensor, attention_mask: Tensor, vocab_size: int, phrases: Sequence[List[int]]) -> Tensor:
    """``[B, vocab_size + colours * shapes]``: which tokens each text holds (multi-hot), and which
    (colour, shape) pairs it names, singular or plural (``phrases`` from :func:`phrase_token_ids`)."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {list(input_ids.shape)}, got {list(attention_mask.shape)}")
    if len(phrases) % 2:
        raise ValueError("phrases: expected singular and plural ids for every pair (an even count)")
    bag = torch.zeros(input_ids.shape[0], vocab_size)
    bag.scatter_reduce_(1, input_ids, attention_mask.float(), reduce="amax")
    pairs = torch.zeros(input_ids.shape[0], len(phrases) // 2)
    for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        row = [i for i, keep in zip(ids, mask) if keep]
        for p in range(len(phrases) // 2):
            pairs[b, p] = float(_contains(row, phrases[2 * p]) or _contains(row, phrases[2 * p + 1]))
    return torch.cat((bag, pairs), dim=1)


class MatchingProbe(nn.Module):
    """Two logits (index 1 = matched, as the ITM head) from the text and scene features."""

    def __init__(self, text_dim: int, scene_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(text_dim + scene_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, text: Tensor, scene: Tensor) -> Tensor:
        return self.net(torch.cat((text, scene), dim=1))
