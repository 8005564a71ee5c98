"""A batch sampler that is a pure function of (seed, epoch, position): resumable mid-epoch, one shard per rank."""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch


class ResumableBatchSampler:
    """Batches of dataset indices for one rank.

    Each epoch shuffles ``range(dataset_size)`` with a generator seeded by ``(seed, epoch)``, pads it by
    wrapping to a multiple of ``world_size`` and gives rank ``r`` every ``world_size``-th index from ``r``
    (every rank gets the same number). Batches of ``batch_size`` are taken in order; an incomplete last
    batch is dropped so that every rank runs the same number of steps.

    The state is ``{"epoch", "position"}``: ``position`` counts the rank's indices already consumed in the
    epoch. Iterating yields the rest of the current epoch from ``position``; the training loop advances the
    state with :meth:`advance` as it *consumes* batches (a DataLoader prefetches ahead of that).
    """

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        for name, value, low in (("dataset_size", dataset_size, 1), ("batch_size", batch_size, 1), ("world_size", world_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in 0..{world_size - 1}, got {rank!r}")
        per_rank = -(-dataset_size // world_size)
        if per_rank < batch_size:
            raise ValueError(
                f"batch_size: {batch_size} is larger than the {per_rank} samples each of the {world_size} ranks gets "
                f"from {dataset_size}"
            )
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.per_rank = per_rank
        self.epoch, self.position = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def epoch_indices(self, epoch: int) -> List[int]:
        """This rank's indices of ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.per_rank * self.world_size
        order = (order * (-(-total // len(order))))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        indices = self.epoch_indices(self.epoch)
        for start in range(self.position, self.batches_per_epoch * self.batch_size, self.batch_size):
            yield indices[start : start + self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position // self.batch_size

    def advance(self) -> None:
        """Record one consumed batch; past the epoch's last batch, move to the next epoch."""
        self.position += self.batch_size
        if self.position + self.batch_size > self.per_rank:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0 or position < 0:
            raise ValueError(f"state: expected non-negative int 'epoch' and 'position', got {state!r}")
        if position % self.batch_size or position + self.batch_size > self.per_rank:
            raise ValueError(
                f"state: position {position} is not a batch boundary of this sampler (batch_size {self.batch_size}, "
                f"{self.per_rank} samples per rank): was the batch size or the number of processes changed?"
            )
        self.epoch, self.position = epoch, position
