"""Samples keyed by ``(epoch, index)`` whose randomness depends on that key only: what makes a resumed run
draw the same samples as an uninterrupted one, whatever the worker processes."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch.utils.data import Dataset

from fastvlp.data.datasets.skipped import SkippedSample


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SeededSamples(Dataset):
    """Item ``(epoch, index)``: ``inner[index]`` drawn under a torch RNG seeded by ``(seed, epoch, index)``
    (so augmentation does not depend on worker processes or on earlier samples), with the caller's RNG
    left untouched. An unreadable record (a :class:`SkippedSample`) is replaced by the next readable index
    so that batches keep their size, and listed in the sample's ``"skipped"`` as ``(index, reason, path)``."""

    def __init__(self, inner: Dataset, seed: int = 0) -> None:
        if len(inner) == 0:
            raise ValueError("inner: expected a non-empty dataset")
        self.inner, self.seed = inner, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key
        skipped = []
        for attempt in range(len(self.inner)):
            current = (index + attempt) % len(self.inner)
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also reseed the caller's CUDA generator,
                # which fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, current))
                sample = self.inner[current]
            if isinstance(sample, SkippedSample):
                skipped.append((current, sample.reason, sample.path))
                continue
            return {**sample, "skipped": skipped}
        raise RuntimeError("SeededSamples: no record of the dataset could be read")
