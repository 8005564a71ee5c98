"""Pre-training batches whose every shape is fixed, so that a training step can be captured once in a CUDA graph
and replayed (:class:`fastvlp.train.captured_step.CapturedTrainingStep`).

The eager forward decides on the device which rows go to detection (matched pairs with annotations) and pads
their targets to the batch's largest object count: reading the ITM labels back and copying the row list and the
counts from the host are host synchronisations, and the padded length changes from batch to batch. Here both
are done beforehand on the host, where the data already is, with the targets padded to a fixed ``max_targets``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fastvlp.models.pretraining_batch import PretrainingBatch
from fastvlp.nn.matched_pairs import pad_set_targets
from fastvlp.ops.matching_cost import check_target_labels


def with_static_targets(batch: PretrainingBatch, max_targets: int, num_classes: int,
                        num_attributes: Optional[int] = None) -> PretrainingBatch:
    """``batch`` with ``detection_rows`` and ``padded_targets`` filled in: the rows whose pair is matched and
    whose target is not None, and their targets padded to ``max_targets`` objects (attributes too, as float32,
    with ``num_attributes``). Call it on the host, before the batch moves to the device: on a GPU, reading the
    ITM labels would synchronise. Raises ``ValueError`` naming ``batch`` when it has no targets, ``max_targets``
    when an image has more objects, and the image whose labels lie outside ``[0, num_classes)``."""
    if not isinstance(batch, PretrainingBatch):
        raise TypeError(f"batch: expected a PretrainingBatch, got {type(batch).__name__}")
    if batch.targets is None:
        raise ValueError("batch: has no detection targets to pad")
    if isinstance(max_targets, bool) or not isinstance(max_targets, int) or max_targets < 0:
        raise ValueError(f"max_targets: expected a non-negative int, got {max_targets!r}")
    matched = [True] * batch.batch_size if batch.itm_labels is None else (batch.itm_labels == 1).tolist()
    rows = [index for index, target in enumerate(batch.targets) if target is not None and matched[index]]
    chosen = [batch.targets[index] for index in rows]
    largest = max((len(target["labels"]) for target in chosen), default=0)
    if largest > max_targets:
        raise ValueError(f"max_targets: an image of this batch has {largest} objects, more than {max_targets}")
    check_target_labels([target["labels"] for target in chosen], num_classes, f" (num_classes={num_classes})")
    device = batch.images.device
    padded = pad_set_targets(chosen, device, num_attributes, torch.float32, length=max_targets)
    return dataclasses.replace(batch, detection_rows=torch.tensor(rows, dtype=torch.int64, device=device),
                               padded_targets=padded)
