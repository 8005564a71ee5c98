"""An exact stand-in for the ResNet in learning probes: per grid cell, which palette colours and which
background tints are present.

Replacing the backbone's body with it (:func:`use_colour_oracle`) takes learning to see out of a probe, so
what remains is learning to compare the text with the image tokens through attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvlp.data.synth.palette import BACKGROUNDS, COLOURS
from fastvlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastvlp.eval.itm_ceiling import COLOUR_TOLERANCE, palette_tensor, tint_tensor

# Share of a cell's pixels a colour must cover to count as present there: stray pixels at blended edges
# stay below it, the smallest shapes (about 15 pixels across) are well above it.
PRESENCE_SHARE = 0.02


class ColourOracle(nn.Module):
    """Stands in for the ResNet body: per cell of ``stride`` pixels, 1 where a palette colour (the first
    ``len(COLOURS)`` channels) or a background tint (the last ``len(BACKGROUNDS)``) is present and 0
    elsewhere (``[B, colours + tints, ceil(H / stride), ceil(W / stride)]``), under the key the backbone
    reads. A pixel near no palette colour belongs to its nearest tint (texture marks, a little darker than
    their background, stay nearest to it); ``tints=False`` leaves the tint channels out. Presence rather
    than the covered fraction, so that the tokens differ between images by as much as the projection's
    weights, not by the few per cent that a shape covers of a cell."""

    def __init__(self, stride: int, output_key: str, tints: bool = True):
        super().__init__()
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride: expected a positive int, got {stride!r}")
        self.stride, self.output_key, self.with_tints = stride, output_key, bool(tints)
        self.register_buffer("palette", palette_tensor())
        self.register_buffer("tints", tint_tensor())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[:, None, None])
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[:, None, None])

    def forward(self, images: Tensor):
        pixels = images * self.std + self.mean
        distance = (pixels[:, None] - self.palette[None, :, :, None, None]).norm(dim=2)
        present = distance < COLOUR_TOLERANCE
        if self.with_tints:
            tint_distance = (pixels[:, None] - self.tints[None, :, :, None, None]).norm(dim=2)
            nearest_tint = F.one_hot(tint_distance.argmin(1), len(self.tints)).permute(0, 3, 1, 2).bool()
            present = torch.cat((present, nearest_tint & ~present.any(1, keepdim=True)), 1)
        share = F.avg_pool2d(present.float(), self.stride, self.stride, ceil_mode=True)
        return {self.output_key: (share >= PRESENCE_SHARE).float()}


def use_colour_oracle(model: nn.Module, stride: int, tints: bool = True) -> None:
    """Replace ``model``'s (an E2EVLP's) backbone body by a :class:`ColourOracle` of cell ``stride`` and its
    input projection by a fresh 1x1 convolution from the palette's colours (and the tints) to the model width."""
    backbone = model.backbone
    backbone.body = ColourOracle(stride, backbone.output, tints)
    channels = len(COLOURS) + (len(BACKGROUNDS) if tints else 0)
    backbone.input_proj = nn.Conv2d(channels, model.config.d_model, kernel_size=1)
