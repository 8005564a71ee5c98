"""Group DETR's query groups (Chen et al., ICCV 2023): more one-to-one supervision per training step.

In training, the decoder runs ``groups`` independent sets of queries over the same encoder output. Each
group is matched to the image's targets on its own and attends only to itself, so every group is an
ordinary DETR query set and inference keeps the first group alone, at its usual cost. Each object then
trains ``groups`` queries a step in place of one, which shortens DETR's slow start. The groups are laid
out along the batch dimension (group-major: row ``g * B + b`` is group ``g`` of image ``b``), so that
self-attention stays within a group without an attention mask and the matcher and criterion see an
ordinary, larger batch whose targets repeat once per group.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

import torch
from torch import Tensor

from fastvlp.nn.matched_pairs import PaddedTargets


def queries_by_group(queries: Tensor, groups: int, batch: int) -> Tensor:
    """``queries`` ``[groups * Q, ...]`` (the groups' rows one after another) -> ``[Q, groups * batch, ...]``,
    sequence-first as the decoder takes them, group-major along the batch."""
    if queries.shape[0] % groups:
        raise ValueError(f"queries: {queries.shape[0]} rows do not split into {groups} groups")
    per_group = queries.reshape(groups, queries.shape[0] // groups, *queries.shape[1:])  # [G, Q, ...]
    expanded = per_group[:, :, None].expand(-1, -1, batch, *queries.shape[1:])  # [G, Q, B, ...]
    return expanded.transpose(0, 1).reshape(queries.shape[0] // groups, groups * batch, *queries.shape[1:])


def repeat_batch(tensor: Tensor, groups: int, dim: int = 0) -> Tensor:
    """``tensor`` repeated ``groups`` times along its batch dimension ``dim`` (group-major)."""
    if groups == 1:
        return tensor
    return torch.cat([tensor] * groups, dim=dim)


TargetBatch = Union[Sequence[Dict[str, Any]], PaddedTargets]


def repeat_targets(targets: TargetBatch, groups: int) -> Union[List[Dict[str, Any]], PaddedTargets]:
    """The targets of a batch for its ``groups`` query groups, in the group-major order of
    :func:`queries_by_group`: DETR's per-image dicts or :class:`PaddedTargets`."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    if isinstance(targets, PaddedTargets):
        if groups == 1:
            return targets
        repeated = {name: repeat_batch(value, groups) for name, value in targets.tensors().items()}
        return PaddedTargets(sizes=None if targets.sizes is None else list(targets.sizes) * groups, **repeated)
    return list(targets) * groups
