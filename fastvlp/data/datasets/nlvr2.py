"""A torch Dataset over Nlvr2Records: both images, the sentence and the label."""

from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.data.images import UnreadableImageError, load_rgb_image
from fastvlp.data.records import Nlvr2Record
from fastvlp.data.transforms import ImageTransform


class Nlvr2Dataset(Dataset):
    """Sample i: left_image, right_image (each transformed on its own), sentence, label (bool or None),
    identifier. SkippedSample when either image does not decode. Flips are refused: the sentence names
    the left and right images, and flipping would not swap them."""

    def __init__(self, records: Sequence[Nlvr2Record], transform: ImageTransform) -> None:
        if not isinstance(transform, ImageTransform):
            raise TypeError(f"transform: expected an ImageTransform, got {type(transform).__name__}")
        if transform.horizontal_flip:
            raise ValueError("transform: expected no horizontal flip for NLVR2")
        if any(not isinstance(r, Nlvr2Record) for r in records):
            raise TypeError("records: expected Nlvr2Record items")
        self.records, self.transform = list(records), transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        images = []
        for path in (record.left_image_path, record.right_image_path):
            try:
                images.append(self.transform(load_rgb_image(path)).image)
            except UnreadableImageError as error:
                return SkippedSample(index, error.reason, str(path))
        return {
            "left_image": images[0],
            "right_image": images[1],
            "sentence": record.sentence,
            "label": record.label,
            "identifier": record.identifier,
        }
