"""Containers that fine-tuning batches and outputs travel in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import Tensor


def move_to(value: Any, device) -> Any:
    """``value`` with every tensor inside it (also in lists, tuples and dicts) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device) for v in value)
    return value


class TaskBatch(dict):
    """A dict of batch fields whose ``to(device)`` moves every tensor in it."""

    def to(self, device) -> "TaskBatch":
        return TaskBatch(move_to(dict(self), device))


@dataclass
class TaskOutput:
    """A task model's forward: the loss to minimise, its named parts, and the logits."""

    loss: Tensor
    losses: Dict[str, Tensor] = field(default_factory=dict)
    logits: Optional[Tensor] = None


def images_and_mask(collated: Dict[str, Any], key: str = "image"):
    """The padded ``[B, 3, H, W]`` images and ``[B, H, W]`` pixel mask (True = padding) of a collated batch."""
    nested = collated[key]
    return nested.tensors, nested.mask


def stack_targets(values) -> Tensor:
    return torch.stack(list(values)) if len(values) else torch.zeros(0)
