"""Ragged per-image rows (DETR's targets: a different number of objects per image) packed into one padded
``[B, T, ...]`` batch in a fixed number of operations, whatever ``B``: one concatenation and one indexed write
per field, where padding image by image costs a copy per image (a kernel launch each on a GPU)."""
from __future__ import annotations

from typing import Sequence

import torch


def ragged_index(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[2, sum(sizes)]`` int64 on ``device``: the (image, slot) of every row of the images' rows concatenated
    in order. Built on the host from the sizes, which are known there, and copied once: no host sync."""
    counts = torch.as_tensor(list(sizes), dtype=torch.int64)
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(image)) - starts[image]
    return torch.stack((image, slot)).to(device)


def pad_ragged(rows: torch.Tensor, index: torch.Tensor, batch: int, length: int, padding_value) -> torch.Tensor:
    """``rows`` (``[N, ...]``, the images' rows concatenated) written into a ``[batch, length, ...]`` tensor of
    ``padding_value`` at ``index`` (:func:`ragged_index`)."""
    padded = rows.new_full((batch, length, *rows.shape[1:]), padding_value)
    if rows.shape[0]:
        padded[index[0], index[1]] = rows
    return padded
