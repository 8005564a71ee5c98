"""What a dataset returns for an example whose image cannot be decoded; the collate function drops it and
counts it in the batch, so that the training loop can add the counts up (also across worker processes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SkippedSample:
    index: int
    reason: str  # a fastvlp.data.skips reason: missing_image or unreadable_image
    path: str
