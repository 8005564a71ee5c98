"""COCO captions and instances, in the published format.

Annotation files: `coco/annotations/captions_<split>.json` (ours) or `captions_<split>2014.json` /
`captions_<split>2017.json` (published), likewise for `instances_`. Images are looked up anywhere under the
coco folder by the annotation's `file_name`, then by the image id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.readers.common import (
    MalformedRecord,
    as_directory,
    check_split,
    file_section,
    find_file,
    load_json,
    locate_image,
    optional_int,
    report_skips,
    require,
    split_base,
    split_names,
    xywh_to_xyxy,
)
from fastvlp.data.records import Category, ImageRecord, ObjectAnnotation
from fastvlp.data.skips import (
    INVALID_BOX,
    MALFORMED_ANNOTATION,
    NO_ANNOTATIONS,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    ReadResult,
    SkipCounter,
)

logger = logging.getLogger(__name__)


def coco_annotation_file(coco_dir: str | Path, kind: str, split: str) -> Path:
    """The `kind` ('captions' or 'instances') annotation file of `split` under `coco_dir`."""
    root = as_directory(coco_dir, "coco_dir")
    if kind not in ("captions", "instances"):
        raise ValueError(f"kind: expected 'captions' or 'instances', got {kind!r}")
    names = [f"{kind}_{name}.json" for name in split_names(check_split(split))]
    return find_file([root / "annotations", root], names, f"COCO {kind} of split {split!r}")


def _readable_id(record, key: str) -> int | None:
    return optional_int(record, key) if isinstance(record, dict) else None


def _image_table(content: dict, skips: SkipCounter, path: Path) -> tuple[dict[int, dict], set[int]]:
    """Image id -> its entry, and the ids of the malformed entries whose id could be read: those images are
    counted here once, so the annotations that name them are dropped without being counted again."""
    images, malformed = {}, set()
    for entry in file_section(content, "images", list, path):
        try:
            image_id = require(entry, "id", int)
            require(entry, "file_name", str)
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"image entry: {error}")
            if (image_id := _readable_id(entry, "id")) is not None:
                malformed.add(image_id)
            continue
        images[image_id] = entry
    return images, malformed


def _record(entry: dict, path: Path, split: str, **fields) -> ImageRecord:
    return ImageRecord(
        source="coco",
        image_id=entry["id"],
        image_path=path,
        width=optional_int(entry, "width"),
        height=optional_int(entry, "height"),
        split=split,
        **fields,
    )


def read_coco_captions(
    coco_dir: str | Path,
    split: str,
    *,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
) -> ReadResult[ImageRecord]:
    """One ImageRecord per image with its captions, in the order of the file's `images` list.

    Skipped and counted once each: malformed image or caption entries, captions of unlisted images, images
    without captions, images whose file is missing (or, with `verify_images`, does not decode). The captions
    of a malformed image entry go with it, and an image whose every caption is malformed is lost with them.
    """
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    path = coco_annotation_file(coco_dir, "captions", split)
    content = load_json(path)
    images, malformed_images = _image_table(content, skips, path)
    captions: dict[int, list[str]] = {image_id: [] for image_id in images}
    had_malformed_caption = set()
    for annotation in file_section(content, "annotations", list, path):
        try:
            image_id = require(annotation, "image_id", int)
            caption = require(annotation, "caption", str).strip()
            if not caption:
                raise MalformedRecord("empty caption")
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"caption: {error}")
            had_malformed_caption.add(_readable_id(annotation, "image_id"))
            continue
        if image_id not in captions:
            if image_id not in malformed_images:  # a malformed image's captions are lost with it, counted once
                skips.add(UNKNOWN_IMAGE, str(image_id))
            continue
        captions[image_id].append(caption)

    index = image_index if image_index is not None else ImageIndex([Path(coco_dir)])
    records = []
    for image_id, entry in images.items():
        if not captions[image_id]:
            if image_id not in had_malformed_caption:  # else already counted, as its malformed captions
                skips.add(NO_ANNOTATIONS, entry["file_name"])
            continue
        image_path = locate_image(index, skips, verify_images, entry["file_name"], image_id, split_base(split))
        if image_path is not None:
            records.append(_record(entry, image_path, split, captions=tuple(captions[image_id])))
    skips = report_skips(skips, caller_skips, logger, f"COCO captions {path}")
    return ReadResult(records, skips)


def _categories(content: dict, skips: SkipCounter, path: Path) -> dict[int, Category]:
    categories = {}
    for entry in file_section(content, "categories", list, path):
        try:
            category = Category(
                require(entry, "id", int), require(entry, "name", str), str(entry.get("supercategory", ""))
            )
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"category: {error}")
            continue
        categories[category.id] = category
    return categories


def read_coco_instances(
    coco_dir: str | Path,
    split: str,
    *,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
) -> ReadResult[ImageRecord]:
    """One ImageRecord per image with its objects (boxes as x0, y0, x1, y1 clipped to the image); images
    without objects are kept, as COCO's evaluation keeps them. `categories` of the result lists COCO's.

    Skipped and counted once each: malformed entries, objects of unlisted images or unknown categories, boxes
    with no area (the object only), images whose file is missing or (with `verify_images`) does not decode.
    The objects of a malformed image entry go with it.
    """
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    path = coco_annotation_file(coco_dir, "instances", split)
    content = load_json(path)
    images, malformed_images = _image_table(content, skips, path)
    categories = _categories(content, skips, path)
    objects: dict[int, list[ObjectAnnotation]] = {image_id: [] for image_id in images}
    for annotation in file_section(content, "annotations", list, path):
        try:
            image_id = require(annotation, "image_id", int)
            category_id = require(annotation, "category_id", int)
            bbox = require(annotation, "bbox", list)
            if len(bbox) != 4:
                raise MalformedRecord(f"bbox: expected 4 numbers, got {len(bbox)}")
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"object: {error}")
            continue
        if image_id not in images:
            if image_id not in malformed_images:  # a malformed image's objects are lost with it, counted once
                skips.add(UNKNOWN_IMAGE, str(image_id))
            continue
        if category_id not in categories:
            skips.add(UNKNOWN_CATEGORY, str(category_id))
            continue
        entry = images[image_id]
        box = xywh_to_xyxy(*bbox, optional_int(entry, "width"), optional_int(entry, "height"))
        if box is None:
            skips.add(INVALID_BOX, f"object {annotation.get('id')} of image {image_id}: {bbox}")
            continue
        objects[image_id].append(
            ObjectAnnotation(
                box=box,
                name=categories[category_id].name,
                category_id=category_id,
                object_id=optional_int(annotation, "id"),
                iscrowd=bool(annotation.get("iscrowd", 0)),
            )
        )

    index = image_index if image_index is not None else ImageIndex([Path(coco_dir)])
    records = []
    for image_id, entry in images.items():
        image_path = locate_image(index, skips, verify_images, entry["file_name"], image_id, split_base(split))
        if image_path is not None:
            records.append(_record(entry, image_path, split, objects=tuple(objects[image_id])))
    skips = report_skips(skips, caller_skips, logger, f"COCO instances {path}")
    return ReadResult(records, skips, categories=tuple(categories.values()))
