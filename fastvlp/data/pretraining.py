"""The pre-training corpus: COCO (captions joined with instances) and Visual Genome (objects, attributes,
region descriptions), from whichever of the two is present under the data folder."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.readers.coco import read_coco_captions, read_coco_instances
from fastvlp.data.readers.common import as_directory
from fastvlp.data.readers.visual_genome import read_visual_genome
from fastvlp.data.records import Category, ImageRecord
from fastvlp.data.skips import MISSING_IMAGE, ReadResult, SkipCounter

logger = logging.getLogger(__name__)


def read_pretraining_images(
    data_dir: str | Path,
    *,
    coco_splits: tuple[str, ...] = ("train",),
    use_coco: bool = True,
    use_visual_genome: bool = True,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
) -> ReadResult[ImageRecord]:
    """COCO images of `coco_splits` with their captions and objects, then Visual Genome images with their
    objects and region phrases. A COCO image needs captions (instances are optional per split; crowd
    annotations are not objects); data sets that are absent are left out with a log line. `categories` of
    the result are COCO's (for `LabelSpace.with_coco_categories`). Raises FileNotFoundError when neither
    data set is there."""
    root = as_directory(data_dir, "data_dir")
    skips = skips if skips is not None else SkipCounter()
    records: list[ImageRecord] = []
    categories: dict[int, Category] = {}
    found = []
    if use_coco and (root / "coco").is_dir():
        found.append("coco")
        index = ImageIndex([root / "coco"])
        for split in coco_splits:
            captioned = read_coco_captions(
                root / "coco", split, skips=skips, verify_images=verify_images, image_index=index
            )
            try:
                instances = read_coco_instances(root / "coco", split, image_index=index)
            except FileNotFoundError:
                logger.info("no COCO instances for split %r: its images have captions only", split)
                instances = ReadResult([], SkipCounter())
            # Missing images were counted once already, by the captions reader.
            skips.merge(instances.skips, exclude=(MISSING_IMAGE,))
            categories.update({c.id: c for c in instances.categories})
            # A crowd box covers a group of instances, not one object: no target (detection fine-tuning agrees).
            objects = {r.image_id: tuple(o for o in r.objects if not o.iscrowd) for r in instances.records}
            records += [replace(r, objects=objects.get(r.image_id, ())) for r in captioned.records]
    if use_visual_genome and (root / "vg").is_dir():
        found.append("vg")
        records += read_visual_genome(root / "vg", skips=skips, verify_images=verify_images).records
    if not found:
        raise FileNotFoundError(f"data_dir: neither coco/ nor vg/ (with use_coco/use_visual_genome) under {root}")
    logger.info("pre-training images: %d from %s", len(records), " + ".join(found))
    return ReadResult(records, skips, categories=tuple(categories.values()))
