"""`--exclude-images FILE`: leave chosen images out of a data set (e.g. downstream test images out of
pre-training). The file holds one image a line: a file name (COCO_val2014_000000000042.jpg, 42.jpg) or a
bare numeric id, which pre-training reads as a COCO image id (a Visual Genome image is left out by its file
name, e.g. 2417.jpg). A published COCO name (2014's COCO_<split>_<digits>, with or without extension, or
2017's zero-padded 000000000042.jpg) also lists its number as a COCO image id, so that the same image is left out under another file name and as Visual
Genome's copy. Blank lines and lines starting with '#' are ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence, TypeVar

R = TypeVar("R")

# COCO's published file names: 2014's COCO_<split>_<id, 12 digits> and 2017's bare zero-padded <12 digits>.
_PUBLISHED_COCO_STEM = re.compile(r"COCO_[A-Za-z0-9-]+_(\d+)|(\d{12})")


@dataclass(frozen=True)
class ExcludedImages:
    names: frozenset[str]  # file names and their stems
    ids: frozenset[int]
    coco_ids: frozenset[int] = frozenset()  # the numbers of published COCO names
    entries: tuple[str, ...] = ()  # the listed lines, once each, in file order


def _entry_keys(entry: str) -> set[tuple[str, object]]:
    """What one listed line matches: ``("id", n)`` for a bare number, else ``("name", name)`` for its file
    name and stem, and ``("coco_id", n)`` for the number of a published COCO name."""
    if entry.isdigit():
        return {("id", int(entry))}
    name = PurePosixPath(entry.replace("\\", "/")).name
    stem = PurePosixPath(name).stem
    keys: set[tuple[str, object]] = {("name", name), ("name", stem)}
    published = _PUBLISHED_COCO_STEM.fullmatch(stem)
    if published:
        keys.add(("coco_id", int(published.group(1) or published.group(2))))
    return keys


def read_excluded_images(path: str | Path) -> ExcludedImages:
    """Parse an exclusion file."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
    names, ids, coco_ids, entries = set(), set(), set(), {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entries[entry] = None
        for kind, value in _entry_keys(entry):
            {"id": ids, "name": names, "coco_id": coco_ids}[kind].add(value)
    return ExcludedImages(frozenset(names), frozenset(ids), frozenset(coco_ids), tuple(entries))


def _image_paths(record) -> list:
    if hasattr(record, "image_path"):
        return [record.image_path]
    if hasattr(record, "left_image_path"):
        return [record.left_image_path, record.right_image_path]
    raise TypeError(f"records: expected records with image paths, got {type(record).__name__}")


def filter_excluded(
    records: Sequence[R], excluded: ExcludedImages, id_attribute: str | None = "image_id",
    matched: Optional[set[str]] = None,
) -> tuple[list[R], int]:
    """The records whose image is not excluded, and how many were left out.

    A record is excluded when one of its image file names (or their stems) is listed, or when the bare ids
    include `getattr(record, id_attribute)`. Ids only mean something within one data set: pass
    id_attribute='coco_id' to exclude COCO images from Visual Genome, or None to match by file name only.
    The COCO ids of published COCO names match `coco_id`, and `image_id` of records whose source is 'coco'.
    `matched`, when given, collects the entries (of `excluded.entries`) that left out a record, so that a
    caller can report the entries that match no image (a misspelt name, another data set's id).
    """
    if not isinstance(excluded, ExcludedImages):
        raise TypeError(f"excluded: expected ExcludedImages, got {type(excluded).__name__}")
    if id_attribute is not None and records and not hasattr(records[0], id_attribute):
        raise ValueError(f"id_attribute: {type(records[0]).__name__} has no attribute {id_attribute!r}")
    if matched is not None and not isinstance(matched, set):
        raise TypeError(f"matched: expected a set or None, got {type(matched).__name__}")
    entries_of: dict[tuple[str, object], list[str]] = {}
    if matched is not None:
        for entry in excluded.entries:
            for key in _entry_keys(entry):
                entries_of.setdefault(key, []).append(entry)
    kept = []
    for record in records:
        paths = _image_paths(record)
        by_name = any(Path(p).name in excluded.names or Path(p).stem in excluded.names for p in paths)
        record_id = getattr(record, id_attribute, None) if id_attribute is not None else None
        by_id = record_id in excluded.ids
        # Other data sets number their images independently, so only COCO's own ids may match COCO's.
        holds_coco_id = id_attribute == "coco_id" or (
            id_attribute == "image_id" and getattr(record, "source", None) == "coco"
        )
        by_coco_id = holds_coco_id and record_id in excluded.coco_ids
        if not (by_name or by_id or by_coco_id):
            kept.append(record)
        elif matched is not None:
            keys = [("name", part) for p in paths for part in (Path(p).name, Path(p).stem)]
            keys += [("id", record_id)] if by_id else []
            keys += [("coco_id", record_id)] if by_coco_id else []
            matched.update(entry for key in keys for entry in entries_of.get(key, ()))
    return kept, len(records) - len(kept)
