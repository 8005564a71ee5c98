"""`--exclude-images FILE`: leave chosen images out of a data set (e.g. downstream test images out of
pre-training). The file holds one image a line: a file name (COCO_val2014_000000000042.jpg, 42.jpg) or a
bare numeric id. Blank lines and lines starting with '#' are ignored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class ExcludedImages:
    names: frozenset[str]  # file names and their stems
    ids: frozenset[int]


def read_excluded_images(path: str | Path) -> ExcludedImages:
    """Parse an exclusion file."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
    names, ids = set(), set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.isdigit():
            ids.add(int(entry))
        else:
            name = PurePosixPath(entry.replace("\\", "/")).name
            names.update((name, PurePosixPath(name).stem))
    return ExcludedImages(frozenset(names), frozenset(ids))


def _image_paths(record) -> list:
    if hasattr(record, "image_path"):
        return [record.image_path]
    if hasattr(record, "left_image_path"):
        return [record.left_image_path, record.right_image_path]
    raise TypeError(f"records: expected records with image paths, got {type(record).__name__}")


def filter_excluded(
    records: Sequence[R], excluded: ExcludedImages, id_attribute: str | None = "image_id"
) -> tuple[list[R], int]:
    """The records whose image is not excluded, and how many were left out.

    A record is excluded when one of its image file names (or their stems) is listed, or when the bare ids
    include `getattr(record, id_attribute)`. Ids only mean something within one data set: pass
    id_attribute='coco_id' to exclude COCO images from Visual Genome, or None to match by file name only.
    """
    if not isinstance(excluded, ExcludedImages):
        raise TypeError(f"excluded: expected ExcludedImages, got {type(excluded).__name__}")
    if id_attribute is not None and records and not hasattr(records[0], id_attribute):
        raise ValueError(f"id_attribute: {type(records[0]).__name__} has no attribute {id_attribute!r}")
    kept = []
    for record in records:
        paths = _image_paths(record)
        by_name = any(Path(p).name in excluded.names or Path(p).stem in excluded.names for p in paths)
        by_id = id_attribute is not None and getattr(record, id_attribute, None) in excluded.ids
        if not (by_name or by_id):
            kept.append(record)
    return kept, len(records) - len(kept)
