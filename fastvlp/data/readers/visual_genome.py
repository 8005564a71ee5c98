"""Visual Genome (1.2/1.4 formats): image_data.json, objects.json, attributes.json and, when present,
region_descriptions.json, whose phrases become the image's captions.

Images are looked up anywhere under the vg folder (images/, VG_100K/, VG_100K_2/) by the file name at the
end of the image's `url`, then by the image id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.label_space import normalise_name
from fastvlp.data.readers.common import (
    MalformedRecord,
    as_directory,
    file_section,
    find_file,
    load_json,
    locate_image,
    optional_int,
    report_skips,
    require,
    xywh_to_xyxy,
)
from fastvlp.data.records import ImageRecord, ObjectAnnotation
from fastvlp.data.skips import INVALID_BOX, MALFORMED_ANNOTATION, UNKNOWN_IMAGE, ReadResult, SkipCounter

logger = logging.getLogger(__name__)


def _json_object(record) -> dict:
    # A null or a string in a list of records is one bad record, not a reason to stop reading.
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def _entry_image_id(entry: dict) -> int:
    """Image id of a per-image entry: 'image_id' (1.2+), 'id' (region descriptions) or a nested 'image'."""
    entry = _json_object(entry)
    for key in ("image_id", "id"):
        if isinstance(entry.get(key), int) and not isinstance(entry.get(key), bool):
            return entry[key]
    nested = entry.get("image")
    if isinstance(nested, dict):
        return _entry_image_id(nested)
    raise MalformedRecord("missing key 'image_id'")


def _object_name(obj: dict) -> str:
    """The first non-blank entry of `names` (1.2+), else `name` (1.0), normalised."""
    names = _json_object(obj).get("names")
    # A blank first name (e.g. ["", "dog"]) does not make the object unusable while another name is given.
    for name in (names if isinstance(names, list) else []) + [obj.get("name")]:
        if isinstance(name, str) and name.strip():
            return normalise_name(name)
    raise MalformedRecord("no non-blank name in 'names' or 'name'")


def _object_id(obj: dict) -> int:
    obj = _json_object(obj)
    value = obj.get("object_id", obj.get("id"))
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedRecord("missing key 'object_id'")
    return value


def _attribute_table(content, path: Path, skips: SkipCounter,
                     structure_skips: SkipCounter | None = None) -> dict[int, tuple[str, ...]]:
    """Object id -> its attribute words. Malformed attribute lists are counted in ``skips``; entries and
    objects that are malformed as such go to ``structure_skips`` (default ``skips``), which the caller
    discards when it reads the objects from this same file and counts those records there."""
    structure_skips = skips if structure_skips is None else structure_skips
    table = {}
    for entry in file_section({"entries": content}, "entries", list, path):
        try:
            objects = require(entry, "attributes", list)
        except MalformedRecord as error:
            structure_skips.add(MALFORMED_ANNOTATION, f"attributes entry: {error}")
            continue
        for obj in objects:
            try:
                words = _json_object(obj).get("attributes")
                object_id = _object_id(obj) if words else None
            except MalformedRecord as error:
                structure_skips.add(MALFORMED_ANNOTATION, f"attributes of an object: {error}")
                continue
            if not words:
                continue
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                skips.add(MALFORMED_ANNOTATION, "attributes of an object: attributes: expected a list of strings")
                continue
            table[object_id] = tuple(dict.fromkeys(normalise_name(w) for w in words if w.strip()))
    return table


def read_visual_genome(
    vg_dir: str | Path,
    *,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
    with_region_descriptions: bool = True,
) -> ReadResult[ImageRecord]:
    """One ImageRecord per image of image_data.json, with its objects (first name normalised, attributes
    from attributes.json) and, when present and asked for, its region phrases as captions.

    Objects come from objects.json, or from attributes.json when objects.json is absent. Skipped and counted:
    malformed entries, objects (without a non-blank name, say) and regions (the record alone), objects and
    region lists of unlisted images, boxes with no area (the object only), images whose file is missing or
    (with `verify_images`) does not decode.
    """
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    root = as_directory(vg_dir, "vg_dir")
    image_data_path = find_file([root], ["image_data.json"], "Visual Genome image data")
    images: dict[int, dict] = {}
    for entry in file_section({"entries": load_json(image_data_path)}, "entries", list, image_data_path):
        try:
            images[_entry_image_id(entry)] = entry
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"image entry: {error}")

    attributes_path = root / "attributes.json"
    objects_path = find_file([root], ["objects.json", "attributes.json"], "Visual Genome objects")
    # Read for its objects too, attributes.json's malformed records are counted once, by the objects pass.
    structure_skips = SkipCounter() if objects_path == attributes_path else None
    attributes = (
        _attribute_table(load_json(attributes_path), attributes_path, skips, structure_skips)
        if attributes_path.is_file() else {}
    )
    objects_key = "objects" if objects_path.name == "objects.json" else "attributes"
    objects: dict[int, list[ObjectAnnotation]] = {image_id: [] for image_id in images}
    for entry in file_section({"entries": load_json(objects_path)}, "entries", list, objects_path):
        try:
            image_id = _entry_image_id(entry)
            entry_objects = require(entry, objects_key, list)
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"objects entry: {error}")
            continue
        if image_id not in images:
            skips.add(UNKNOWN_IMAGE, str(image_id))
            continue
        width, height = optional_int(images[image_id], "width"), optional_int(images[image_id], "height")
        for obj in entry_objects:
            try:
                object_id, name = _object_id(obj), _object_name(obj)
                x, y, w, h = (require(obj, key, (int, float)) for key in ("x", "y", "w", "h"))
            except MalformedRecord as error:
                skips.add(MALFORMED_ANNOTATION, f"object of image {image_id}: {error}")
                continue
            box = xywh_to_xyxy(x, y, w, h, width, height)
            if box is None:
                skips.add(INVALID_BOX, f"object {object_id} of image {image_id}: {[x, y, w, h]}")
                continue
            objects[image_id].append(ObjectAnnotation(box, name, attributes.get(object_id, ()), None, object_id))

    captions: dict[int, list[str]] = {}
    regions_path = root / "region_descriptions.json"
    if with_region_descriptions and regions_path.is_file():
        for entry in file_section({"entries": load_json(regions_path)}, "entries", list, regions_path):
            try:
                image_id = _entry_image_id(entry)
                regions = require(entry, "regions", list)
            except MalformedRecord as error:
                skips.add(MALFORMED_ANNOTATION, f"region descriptions: {error}")
                continue
            if image_id not in images:
                skips.add(UNKNOWN_IMAGE, f"region descriptions of {image_id}")
                continue
            phrases = captions.setdefault(image_id, [])
            for region in regions:  # a bad region costs only its own phrase
                try:
                    phrase = require(region, "phrase", str).strip()
                    if not phrase:
                        raise MalformedRecord("empty phrase")
                except MalformedRecord as error:
                    skips.add(MALFORMED_ANNOTATION, f"region of image {image_id}: {error}")
                    continue
                phrases.append(phrase)

    index = image_index if image_index is not None else ImageIndex([root])
    records = []
    for image_id, entry in images.items():
        url = entry.get("url") if isinstance(entry.get("url"), str) else None
        image_path = locate_image(index, skips, verify_images, url or f"{image_id}.jpg", image_id)
        if image_path is None:
            continue
        records.append(
            ImageRecord(
                source="vg",
                image_id=image_id,
                image_path=image_path,
                width=optional_int(entry, "width"),
                height=optional_int(entry, "height"),
                split="train",
                captions=tuple(captions.get(image_id, ())),
                objects=tuple(objects[image_id]),
                coco_id=optional_int(entry, "coco_id"),
            )
        )
    skips = report_skips(skips, caller_skips, logger, f"Visual Genome {root}")
    return ReadResult(records, skips)
