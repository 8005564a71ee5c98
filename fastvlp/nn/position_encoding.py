"""2-D sine position encoding of image feature maps (DETR's ``PositionEmbeddingSine`` semantics)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of each feature-map cell's (y, x) position.

    Positions are counted over the valid (not padded) cells only, so an image's encoding does not
    depend on how much padding the batch added to it. With ``normalize`` they are divided by the
    image's valid extent and multiplied by ``scale`` (default ``2 * pi``), so the encoding is the
    same for every image size. Channels ``[0, num_pos_feats)`` encode y, the rest x; within each
    half, even channels hold sines and odd channels cosines of ``position / temperature ** (2i / F)``.

    Forward: ``mask`` bool ``[B, H, W]``, True = padding -> ``[B, 2 * num_pos_feats, H, W]`` float32.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if isinstance(num_pos_feats, bool) or not isinstance(num_pos_feats, int) or num_pos_feats < 2 or num_pos_feats % 2:
            raise ValueError(f"num_pos_feats: expected a positive even int, got {num_pos_feats!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if scale is not None and not normalize:
            raise ValueError("scale: only meaningful with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.scale = 2 * math.pi if scale is None else float(scale)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
            raise ValueError(f"mask: expected a bool tensor [B, H, W] (True = padding), got {getattr(mask, 'shape', mask)}")
        # The encoding is a fixed function of the mask: keep it in float32 even under autocast.
        with torch.autocast(device_type=mask.device.type, enabled=False):
            valid = (~mask).to(torch.float32)
            y_position = valid.cumsum(1)
            x_position = valid.cumsum(2)
            if self.normalize:
                eps = 1e-6
                y_position = y_position / (y_position[:, -1:, :] + eps) * self.scale
                x_position = x_position / (x_position[:, :, -1:] + eps) * self.scale
            channel = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
            frequency = self.temperature ** (2 * torch.div(channel, 2, rounding_mode="floor") / self.num_pos_feats)
            return torch.cat((_interleave_sin_cos(y_position, frequency), _interleave_sin_cos(x_position, frequency)), dim=3).permute(
                0, 3, 1, 2
            )


def _interleave_sin_cos(position: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` positions -> ``[B, H, W, F]``: sin on even channels, cos on odd ones."""
    angle = position[..., None] / frequency
    return torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=4).flatten(3)
