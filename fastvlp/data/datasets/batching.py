"""Collate functions: drop SkippedSamples (counting them per reason in the batch), pad the images into a
NestedTensor, and keep per-sample targets and texts as lists (DETR style)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.skipped import SkippedSample

_IMAGE_KEYS = ("image", "left_image", "right_image")


def collate_samples(samples: Sequence, size_divisibility: int = 1) -> dict:
    """A batch dict: each image key of the samples becomes a NestedTensor; 'target' tensors of equal shape are
    stacked; every other key becomes a list. 'skipped' maps reason -> count of dropped samples, and
    'num_samples' is the number kept (possibly 0, in which case only those two keys are present)."""
    if isinstance(samples, (dict, SkippedSample)) or not isinstance(samples, Sequence):
        raise TypeError("samples: expected a sequence of dataset samples")
    kept = [s for s in samples if not isinstance(s, SkippedSample)]
    if any(not isinstance(s, dict) for s in kept):
        raise TypeError("samples: expected dicts or SkippedSample items")
    batch: dict = {
        "skipped": dict(Counter(s.reason for s in samples if isinstance(s, SkippedSample))),
        "num_samples": len(kept),
    }
    if not kept:
        return batch
    for key in kept[0]:
        values = [s[key] for s in kept]
        if key in _IMAGE_KEYS:
            batch[key] = nested_tensor_from_images(values, size_divisibility)
        elif key == "target" and all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
