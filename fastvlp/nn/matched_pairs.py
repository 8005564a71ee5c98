"""The matched (prediction, target) pairs of one or more decoder layers, in the form the set losses read, from
either form of matches:

* DETR's per-image ``(prediction indices, target indices)`` lists, which any matcher returns: gathered image
  by image, as DETR's ``SetCriterion`` does (a few operations per image and layer);
* one dense ``[B, Q]`` assignment on padded targets, which the batched solver returns
  (:meth:`fastvlp.nn.HungarianMatcher.assign`): gathered for every image at once, in a fixed number of
  operations whatever the batch size. Its pairs are all ``B * Q`` predictions, with ``valid`` marking the
  matched ones; each unmatched one is paired with a valid box, so that it adds exactly nothing.

Layers of one shape come stacked along the batch (``[L * B, Q, ...]``), so that each loss runs once for all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastvlp.ops.matching_cost import pad_targets
from fastvlp.ops.ragged import pad_ragged, ragged_index

Match = Tuple[Tensor, Tensor]
# A box paired with the predictions that have no target (a valid box: its GIoU with itself is 1).
FILLER_BOX = 0.5


@dataclass
class PaddedTargets:
    """A batch's targets padded to its largest object count, or to a fixed one, ``T``: ``labels`` ``[B, T]``
    int64, ``boxes`` ``[B, T, 4]``, ``counts`` ``[B]`` int64 (on the device), ``attributes`` ``[B, T, A]`` (0 for
    images without attribute annotations, None when not asked for) and ``sizes`` (the counts on the host, where
    known). Nothing in the losses reads ``sizes``: padded targets carried by a batch of fixed shapes can be
    replayed in a CUDA graph."""

    labels: Tensor
    boxes: Tensor
    counts: Tensor
    sizes: Optional[List[int]] = None
    attributes: Optional[Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "PaddedTargets":
        """A copy with every tensor on ``device``."""
        moved = {name: value.to(device, non_blocking=non_blocking) for name, value in self.tensors().items()}
        return PaddedTargets(sizes=self.sizes, **moved)

    def tensors(self) -> Dict[str, Tensor]:
        """The tensors by field name (``attributes`` only where present)."""
        named = {"labels": self.labels, "boxes": self.boxes, "counts": self.counts}
        if self.attributes is not None:
            named["attributes"] = self.attributes
        return named


@dataclass
class MatchedPairs:
    """The matched pairs of ``num_layers`` decoder layers stacked along the batch (``[L * B, Q, ...]`` outputs,
    layer by layer). ``target_classes`` ``[L * B, Q]`` (no-object where unmatched); ``num_targets``
    ``[L * B]``, each image's target count (matched or not: an image may have more targets than predictions);
    ``select(t)`` takes a ``[L * B, Q, ...]`` output to the pairs' rows ``[M, ...]``, in the order of
    ``target_boxes`` ``[M, 4]`` and ``target_attributes`` ``[M, A]`` (zero rows for objects without
    attributes; None when not asked for); ``valid`` ``[M]`` marks the rows that are matched pairs (None: all
    are); ``per_layer(x)`` sums a value per row ``[M]`` into one per layer ``[L]``."""

    target_classes: Tensor
    num_targets: Tensor
    select: Callable[[Tensor], Tensor]
    target_boxes: Tensor
    target_attributes: Optional[Tensor]
    valid: Optional[Tensor]
    num_layers: int
    per_layer: Callable[[Tensor], Tensor]


def _checked_attributes(target: Mapping[str, Tensor], num_attributes: int) -> Optional[Tensor]:
    attributes = target.get("attributes")
    if attributes is not None and (attributes.dim() != 2 or attributes.shape[1] != num_attributes):
        raise ValueError(f"targets: 'attributes' must be [N, {num_attributes}], got {list(attributes.shape)}")
    return attributes


def pad_set_targets(targets: Sequence[Mapping[str, Tensor]], device: torch.device,
                    num_attributes: Optional[int] = None, attribute_dtype: torch.dtype = torch.float32,
                    length: Optional[int] = None) -> PaddedTargets:
    """``targets`` (DETR's per-image dicts) padded on ``device`` to their largest object count, or to ``length``;
    with ``num_attributes``, their attributes too, as ``attribute_dtype``."""
    sizes = [len(target["labels"]) for target in targets]
    index = ragged_index(sizes, device) if targets else None  # one index for every field
    labels, boxes, counts = pad_targets([target["labels"] for target in targets],
                                        [target["boxes"] for target in targets], device, length, index)
    attributes = None
    if num_attributes is not None:
        rows = []
        for target, size in zip(targets, sizes):
            given = _checked_attributes(target, num_attributes)
            rows.append(torch.zeros(size, num_attributes, dtype=torch.bool, device=device) if given is None
                        else given.to(device))
        # One conversion for the batch (multi-hot bool or float rows concatenate to float where they mix).
        flat = torch.cat(rows).to(attribute_dtype) if rows else torch.zeros(0, num_attributes, dtype=attribute_dtype,
                                                                             device=device)
        attributes = pad_ragged(flat, index, len(sizes), labels.shape[1], 0)
    return PaddedTargets(labels, boxes, counts, sizes, attributes)


def repeat_targets(padded: PaddedTargets, times: int) -> PaddedTargets:
    """``padded`` for ``times`` layers stacked along the batch: each layer's images face the same targets."""
    if times == 1:
        return padded
    return PaddedTargets(padded.labels.repeat(times, 1), padded.boxes.repeat(times, 1, 1), padded.counts.repeat(times),
                         None if padded.sizes is None else padded.sizes * times,
                         None if padded.attributes is None else padded.attributes.repeat(times, 1, 1))


def pairs_from_assignment(assignment: Tensor, padded: PaddedTargets, num_classes: int,
                          num_layers: int = 1) -> MatchedPairs:
    """The pairs of a ``[L * B, Q]`` assignment (target column or -1; ``L = num_layers`` layers stacked) on
    ``padded`` targets of as many rows (:func:`repeat_targets`), every image of every layer at once."""
    rows, queries = assignment.shape
    matched = assignment >= 0
    valid = matched.reshape(-1)
    if padded.labels.shape[1] == 0:  # no image has a target: nothing to gather from
        target_classes = torch.full_like(assignment, num_classes)
        target_boxes = padded.boxes.new_full((rows * queries, 4), FILLER_BOX)
        attributes = None if padded.attributes is None else padded.attributes.new_zeros(
            (rows * queries, padded.attributes.shape[-1]))
    else:
        column = assignment.clamp(min=0)
        target_classes = torch.where(matched, padded.labels.gather(1, column), num_classes)
        boxes = padded.boxes.gather(1, column[..., None].expand(-1, -1, 4)).reshape(-1, 4)
        target_boxes = torch.where(valid[:, None], boxes, FILLER_BOX)
        attributes = None
        if padded.attributes is not None:
            gathered = padded.attributes.gather(1, column[..., None].expand(-1, -1, padded.attributes.shape[-1]))
            attributes = torch.where(valid[:, None], gathered.reshape(rows * queries, -1), 0)
    return MatchedPairs(target_classes, padded.counts,
                        lambda output: output.reshape(rows * queries, *output.shape[2:]), target_boxes, attributes,
                        valid, num_layers, lambda values: values.reshape(num_layers, values.shape[0] // num_layers).sum(1))


def pairs_from_matches(matches: Sequence[Match], targets: Sequence[Mapping[str, Tensor]], num_classes: int,
                       queries_shape: Tuple[int, int], device: torch.device, num_attributes: Optional[int] = None,
                       attribute_dtype: torch.dtype = torch.float32, num_layers: int = 1) -> MatchedPairs:
    """The pairs of DETR's per-image matches, gathered image by image as DETR does: ``matches`` holds
    ``L * B`` images' (``L = num_layers`` layers stacked, ``queries_shape`` is ``(L * B, Q)``), ``targets``
    the ``B`` images' targets, on ``device``. With ``num_attributes``, their attributes are gathered too, as
    ``attribute_dtype``."""
    batch = len(targets)
    layer_targets = [targets[image % batch] for image in range(len(matches))] if batch else []
    if matches:
        # On the outputs' device, whatever device the matcher returned them on (DETR's own returns CPU indices).
        image_index = torch.cat([torch.full_like(source, image) for image, (source, _) in enumerate(matches)]).to(device)
        query_index = torch.cat([source for source, _ in matches]).to(device)
    else:
        image_index = query_index = torch.zeros(0, dtype=torch.int64, device=device)

    def gathered(field: Callable[[Mapping[str, Tensor]], Tensor], empty_shape) -> Tensor:
        """``field(target)`` at each image's matched target indices, concatenated."""
        values = []
        for target, (_, index) in zip(layer_targets, matches):
            value = field(target)
            values.append(value[index.to(value.device)])
        return torch.cat(values) if values else torch.zeros(empty_shape, device=device)

    # Labels of any integer dtype: index_put needs int64 like target_classes.
    labels = gathered(lambda target: target["labels"], (0,)).to(device, torch.int64)
    target_classes = torch.full(queries_shape, num_classes, dtype=torch.int64, device=device)
    target_classes[image_index, query_index] = labels
    boxes = gathered(lambda target: target["boxes"], (0, 4))
    attributes = None
    if num_attributes is not None:
        def attributes_of(target):
            given = _checked_attributes(target, num_attributes)
            return torch.zeros(len(target["labels"]), num_attributes, device=device) if given is None else given

        attributes = gathered(attributes_of, (0, num_attributes)).to(device, attribute_dtype)
    num_targets = torch.as_tensor([len(target["labels"]) for target in layer_targets], dtype=torch.int64,
                                  device=device)
    layer_of_pair = torch.div(image_index, max(batch, 1), rounding_mode="floor")
    return MatchedPairs(target_classes, num_targets, lambda output: output[image_index, query_index], boxes,
                        attributes, None, num_layers,
                        lambda values: values.new_zeros(num_layers).index_add(0, layer_of_pair, values))
