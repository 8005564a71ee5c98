"""Padding images of different sizes into one batch with a pixel mask (DETR's NestedTensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class NestedTensor:
    """`tensors` [B, C, H, W] padded with zeros at the bottom and right; `mask` [B, H, W], True = padding."""

    tensors: torch.Tensor
    mask: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> NestedTensor:
        return NestedTensor(
            self.tensors.to(device, non_blocking=non_blocking), self.mask.to(device, non_blocking=non_blocking)
        )

    def pin_memory(self) -> NestedTensor:
        """Called by DataLoader(pin_memory=True) on batch elements that define it."""
        return NestedTensor(self.tensors.pin_memory(), self.mask.pin_memory())

    def decompose(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors, self.mask


def nested_tensor_from_images(images: Sequence[torch.Tensor], size_divisibility: int = 1) -> NestedTensor:
    """Pad [C, H_i, W_i] images to the largest H and W (rounded up to `size_divisibility`)."""
    if isinstance(images, torch.Tensor) or len(images) == 0:
        raise ValueError("images: expected a non-empty sequence of [C, H, W] tensors")
    if isinstance(size_divisibility, bool) or not isinstance(size_divisibility, int) or size_divisibility < 1:
        raise ValueError(f"size_divisibility: expected a positive int, got {size_divisibility!r}")
    first = images[0]
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(f"images[{i}]: expected a [C, H, W] tensor, got {getattr(image, 'shape', type(image))}")
        if image.shape[0] != first.shape[0] or image.dtype != first.dtype or image.device != first.device:
            raise ValueError(f"images[{i}]: channels, dtype and device must match images[0]")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    height = -(-height // size_divisibility) * size_divisibility
    width = -(-width // size_divisibility) * size_divisibility
    tensors = first.new_zeros((len(images), first.shape[0], height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for i, image in enumerate(images):
        tensors[i, :, : image.shape[1], : image.shape[2]].copy_(image)
        mask[i, : image.shape[1], : image.shape[2]] = False
    return NestedTensor(tensors, mask)
