"""Split sizes of the synthetic data: 100 validation and 100 test images once there are 500 images or
more (as in the Karpathy splits, at a smaller scale), a fifth each below that."""

from __future__ import annotations

import numpy as np

HELD_OUT = 100
FULL_SIZE_FROM = 500


def held_out_size(num_images: int) -> int:
    """Images in each of the validation and test splits."""
    if num_images < 0:
        raise ValueError(f"num_images: expected >= 0, got {num_images}")
    if num_images >= FULL_SIZE_FROM:
        return HELD_OUT
    return max(1, num_images // 5) if num_images >= 3 else 0


def assign_splits(rng: np.random.Generator, num_images: int, with_restval: bool = False) -> list[str]:
    """A random split name for each image: 'val' and 'test' of `held_out_size` each, optionally a
    'restval' of a twentieth, and 'train' for the rest."""
    held = held_out_size(num_images)
    restval = max(1, num_images // 20) if with_restval and num_images >= 3 * held + 1 else 0
    names = ["val"] * held + ["test"] * held + ["restval"] * restval
    names += ["train"] * (num_images - len(names))
    return [names[i] for i in rng.permutation(num_images)]
