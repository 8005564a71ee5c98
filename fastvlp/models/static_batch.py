"""Pre-training batches whose every shape is fixed, so that a training step can be captured once in a CUDA graph
and replayed (:class:`fastvlp.train.captured_step.CapturedTrainingStep`).

The eager forward decides during the step which rows go to detection (matched pairs with annotations) and pads
their targets to the batch's largest object count: reading the ITM labels back from the device is a host
synchronisation, copies of host data (the row list, the target counts) cannot be captured, and the padded length
changes from batch to batch. Here both are done beforehand on the host, where the data already is, with the
targets padded to a fixed ``max_targets``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastvlp.models.masking import IGNORE_INDEX
from fastvlp.models.pretraining_batch import PretrainingBatch
from fastvlp.nn.matched_pairs import pad_set_targets
from fastvlp.ops.matching_cost import check_target_labels


def with_static_targets(batch: PretrainingBatch, max_targets: Optional[int], num_classes: int,
                        num_attributes: Optional[int] = None) -> PretrainingBatch:
    """``batch`` with ``detection_rows`` and ``padded_targets`` filled in: the rows whose pair is matched and
    whose target is not None, and their targets padded to ``max_targets`` objects (None: to those rows' own
    largest count, as the eager forward pads them; attributes too, as float32, with ``num_attributes``). Call it on the host, before the batch moves to the device: on a GPU, reading the
    ITM labels would synchronise. Raises ``ValueError`` naming ``batch`` when it has no targets, ``max_targets``
    when an image has more objects, and the image whose labels lie outside ``[0, num_classes)``."""
    if not isinstance(batch, PretrainingBatch):
        raise TypeError(f"batch: expected a PretrainingBatch, got {type(batch).__name__}")
    if batch.targets is None:
        raise ValueError("batch: has no detection targets to pad")
    if max_targets is not None and (isinstance(max_targets, bool) or not isinstance(max_targets, int) or max_targets < 0):
        raise ValueError(f"max_targets: expected a non-negative int or None, got {max_targets!r}")
    matched = [True] * batch.batch_size if batch.itm_labels is None else (batch.itm_labels == 1).tolist()
    rows = [index for index, target in enumerate(batch.targets) if target is not None and matched[index]]
    chosen = [batch.targets[index] for index in rows]
    largest = max((len(target["labels"]) for target in chosen), default=0)
    max_targets = largest if max_targets is None else max_targets
    if largest > max_targets:
        raise ValueError(f"max_targets: an image of this batch has {largest} objects, more than {max_targets}")
    check_target_labels([target["labels"] for target in chosen], num_classes, f" (num_classes={num_classes})")
    device = batch.images.device
    padded = pad_set_targets(chosen, device, num_attributes, torch.float32, length=max_targets)
    return dataclasses.replace(batch, detection_rows=torch.tensor(rows, dtype=torch.int64, device=device),
                               padded_targets=padded)


def _pad_last(values: Tensor, length: int, fill) -> Tensor:
    """``values`` ``[B, T]`` padded with ``fill`` to ``[B, length]``."""
    padded = values.new_full((values.shape[0], length), fill)
    padded[:, : values.shape[1]] = values
    return padded


def pad_batch(batch: PretrainingBatch, image_size: Tuple[int, int], text_length: int,
              pad_token_id: int) -> Optional[PretrainingBatch]:
    """``batch`` with its images padded to ``image_size`` ``(H, W)`` (the pixel mask marks the padding) and its
    texts and captions to ``text_length`` tokens (``pad_token_id``, masked out, no MLM label); None when an
    image or a text of the batch is larger. The masks keep the padded tokens out of every attention and every loss,
    so padding the texts changes nothing. A larger image canvas changes the backbone's features near the edge of
    each image, as a larger batch canvas does in any DETR-style batch (the convolutions see padding, not the
    tensor's border), and trainable batch norm (``tiny``) counts the padded pixels in its statistics."""
    height, width = image_size
    if batch.images.shape[2] > height or batch.images.shape[3] > width or batch.input_ids.shape[1] > text_length \
            or (batch.caption_ids is not None and batch.caption_ids.shape[1] > text_length):
        return None
    images = batch.images.new_zeros((*batch.images.shape[:2], height, width))
    images[:, :, : batch.images.shape[2], : batch.images.shape[3]] = batch.images
    pixel_mask = batch.pixel_mask.new_ones((batch.pixel_mask.shape[0], height, width))
    pixel_mask[:, : batch.pixel_mask.shape[1], : batch.pixel_mask.shape[2]] = batch.pixel_mask
    changes = {"images": images, "pixel_mask": pixel_mask,
               "input_ids": _pad_last(batch.input_ids, text_length, pad_token_id),
               "text_attention_mask": _pad_last(batch.text_attention_mask, text_length, False)}
    if batch.token_type_ids is not None:
        changes["token_type_ids"] = _pad_last(batch.token_type_ids, text_length, 0)
    if batch.mlm_labels is not None:
        changes["mlm_labels"] = _pad_last(batch.mlm_labels, text_length, IGNORE_INDEX)
    if batch.caption_ids is not None:
        changes["caption_ids"] = _pad_last(batch.caption_ids, text_length, pad_token_id)
        changes["caption_attention_mask"] = _pad_last(batch.caption_attention_mask, text_length, False)
    return dataclasses.replace(batch, **changes)
