"""A torch Dataset over ImageRecords (COCO, Visual Genome, Karpathy files): the transformed image, the
objects as DETR targets (normalised cxcywh boxes, class indices, multi-hot attributes) and the captions."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.data.images import UnreadableImageError, load_rgb_image
from fastvlp.data.label_space import LabelSpace
from fastvlp.data.records import ImageRecord
from fastvlp.data.transforms import ImageTransform, swap_left_right


class ImageRecordDataset(Dataset):
    """Sample i is a dict:

    image [3, H, W] float; boxes [N, 4] (cx, cy, w, h) / image size; labels [N] int64 class indices;
    attributes [N, A] bool multi-hot (A = len(attribute_space), 0 without one); has_attributes [N] bool;
    captions list[str] (left/right swapped when the image was flipped); image_id; size and original_size
    (H, W); unlabelled_objects, the objects dropped because their class is not in the label space;
    empty_boxes, the objects dropped because their box, clamped to the decoded image, has no area.

    An object's class is `category_to_label[category_id]` when given and the object has a COCO category,
    otherwise `label_space.get(name)`. With neither, objects are ignored (captioning, retrieval): boxes and
    labels are empty. An image that does not decode gives a SkippedSample instead of a dict.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        transform: ImageTransform,
        label_space: LabelSpace | None = None,
        attribute_space: LabelSpace | None = None,
        category_to_label: Mapping[int, int] | None = None,
    ) -> None:
        if not isinstance(transform, ImageTransform):
            raise TypeError(f"transform: expected an ImageTransform, got {type(transform).__name__}")
        if any(not isinstance(r, ImageRecord) for r in records):
            raise TypeError("records: expected ImageRecord items")
        for name, space in (("label_space", label_space), ("attribute_space", attribute_space)):
            if space is not None and not isinstance(space, LabelSpace):
                raise TypeError(f"{name}: expected a LabelSpace or None, got {type(space).__name__}")
        self.records, self.transform = list(records), transform
        self.label_space, self.attribute_space = label_space, attribute_space
        self.category_to_label = dict(category_to_label or {})

    def __len__(self) -> int:
        return len(self.records)

    def _label(self, obj) -> int | None:
        if obj.category_id is not None and obj.category_id in self.category_to_label:
            return self.category_to_label[obj.category_id]
        return self.label_space.get(obj.name) if self.label_space is not None else None

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = load_rgb_image(record.image_path)
        except UnreadableImageError as error:
            return SkippedSample(index, error.reason, str(record.image_path))

        kept, labels = [], []
        uses_objects = self.label_space is not None or bool(self.category_to_label)
        if uses_objects:
            for obj in record.objects:
                label = self._label(obj)
                if label is not None:
                    kept.append(obj)
                    labels.append(label)
        boxes = torch.tensor([obj.box for obj in kept], dtype=torch.float32).reshape(-1, 4)
        out = self.transform(image, boxes)
        # A box the reader could not clip (no image size in the annotation, or a wrong one) can lie outside
        # the decoded image; clamped to it, it has no area and is dropped, as DETR drops such boxes.
        has_area = (out.boxes[:, 2] > 0) & (out.boxes[:, 3] > 0)
        empty_boxes = int((~has_area).sum())
        if empty_boxes:
            kept = [obj for obj, keep in zip(kept, has_area.tolist()) if keep]
            labels = [label for label, keep in zip(labels, has_area.tolist()) if keep]
        target_boxes = out.boxes[has_area] if empty_boxes else out.boxes

        num_attributes = len(self.attribute_space) if self.attribute_space is not None else 0
        attributes = torch.zeros(len(kept), num_attributes, dtype=torch.bool)
        if self.attribute_space is not None:
            for row, obj in enumerate(kept):
                for word in obj.attributes:
                    column = self.attribute_space.get(word)
                    if column is not None:
                        attributes[row, column] = True
        captions = [swap_left_right(c) if out.flipped else c for c in record.captions]
        return {
            "image": out.image,
            "boxes": target_boxes,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "attributes": attributes,
            "has_attributes": attributes.any(dim=1),
            "captions": captions,
            "image_id": record.image_id,
            "size": out.size,
            "original_size": out.original_size,
            "unlabelled_objects": len(record.objects) - len(kept) - empty_boxes if uses_objects else 0,
            "empty_boxes": empty_boxes,
        }


class ImageRecordView(Dataset):
    """What a task takes from each sample of an :class:`ImageRecordDataset` (``inner``): ``view(sample,
    index)`` for a readable image; a :class:`SkippedSample` passes through untouched, for the caller to
    count and replace."""

    def __init__(self, inner: ImageRecordDataset) -> None:
        if not isinstance(inner, ImageRecordDataset):
            raise TypeError(f"inner: expected an ImageRecordDataset, got {type(inner).__name__}")
        self.inner = inner

    @property
    def records(self):
        return self.inner.records

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        sample = self.inner[index]
        return sample if isinstance(sample, SkippedSample) else self.view(sample, index)

    def view(self, sample: Dict[str, Any], index: int) -> Dict[str, Any]:
        raise NotImplementedError
