"""Helpers shared by the readers: finding annotation files, parsing boxes, locating and checking images."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.images import image_problem
from fastvlp.data.skips import MISSING_IMAGE, SkipCounter

_YEAR_SUFFIX = re.compile(r"(\d{4})$")


class MalformedRecord(ValueError):
    """A single annotation record that lacks a key or has a value of the wrong type."""


def as_directory(path: str | Path, argument: str) -> Path:
    """`path` as a Path to an existing folder; TypeError/FileNotFoundError naming `argument` otherwise."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{argument}: expected a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{argument}: no such folder: {path}")
    return path


def check_split(split: str) -> str:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty str such as 'train' or 'val', got {split!r}")
    return split


def split_base(split: str) -> str:
    """'train2014' -> 'train', 'val2017' -> 'val', 'test-dev2015' -> 'test-dev'; other names unchanged."""
    return _YEAR_SUFFIX.sub("", split)


def split_names(split: str) -> list[str]:
    """The names a split goes by: ours first ('train'), then the published ones ('train2014', ...)."""
    base = split_base(split)
    return list(dict.fromkeys([split, base, f"{base}2014", f"{base}2015", f"{base}2017"]))


def find_file(folders: list[Path], names: list[str], what: str) -> Path:
    """The first of `names` that exists in one of `folders`; FileNotFoundError listing the tries otherwise."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    tried = ", ".join(str(folder / name) for folder in folders for name in names)
    raise FileNotFoundError(f"{what}: none of these files exists: {tried}")


def load_json(path: Path):
    """The parsed file; a file that is not JSON at all is an error (it is not one bad record)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error


def require(record: dict, key: str, kind: type | tuple[type, ...]):
    """record[key], checked to be of `kind` (bool is never accepted as a number)."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise MalformedRecord(f"missing key {key!r}")
    value = record[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MalformedRecord(f"key {key!r}: expected {kind}, got a bool")
    if not isinstance(value, kind):
        raise MalformedRecord(f"key {key!r}: expected {kind}, got {type(value).__name__}")
    return value


def optional_int(record: dict, key: str) -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def xywh_to_xyxy(
    x: float, y: float, w: float, h: float, width: int | None = None, height: int | None = None
) -> tuple[float, float, float, float] | None:
    """The (x0, y0, x1, y1) box clipped to the image when its size is known; None when the box is not finite or
    has no area (negative or zero size, or nothing inside the image)."""
    values = (x, y, w, h)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        return None
    if w <= 0 or h <= 0:
        return None
    x0, y0, x1, y1 = float(x), float(y), float(x + w), float(y + h)
    if width is not None and height is not None:
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def locate_image(
    index: ImageIndex,
    skips: SkipCounter,
    verify: bool,
    file_name: str | None = None,
    image_id: int | None = None,
    hint: str | None = None,
) -> Path | None:
    """The image's path, or None after counting why it cannot be used (missing, or not decoding when `verify`)."""
    path = index.find(file_name=file_name, image_id=image_id, hint=hint)
    if path is None:
        skips.add(MISSING_IMAGE, file_name or str(image_id))
        return None
    if verify:
        problem = image_problem(path)
        if problem is not None:
            skips.add(problem, str(path))
            return None
    return path


def file_section(content, key: str, kind: type, path: Path):
    """A top-level part of an annotation file; a file without it is the wrong file, which is an error."""
    try:
        return require(content, key, kind)
    except MalformedRecord as error:
        raise ValueError(f"{path}: not the expected format ({error})") from error


def report_skips(own: SkipCounter, skips: SkipCounter | None, logger: logging.Logger, what: str) -> SkipCounter:
    """Log what one read skipped (`own`), then add it to the caller's `skips`; returns the counter the read's
    result carries: `skips` when given (its totals span every read it was passed to), else `own`.

    Each read counts into its own counter so that its log line names only its own skips, not those of the
    readers that ran before it with the same `skips`."""
    if skips is not None and not isinstance(skips, SkipCounter):
        raise TypeError(f"skips: expected a SkipCounter or None, got {type(skips).__name__}")
    own.report(logger, what)
    if skips is None:
        return own
    skips.merge(own)
    return skips
