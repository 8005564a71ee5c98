"""NLVR2: one JSON object a line in `nlvr2/<split>.json` (or `nlvr2/data/<split>.json`).

The image pair of identifier `split-set-pair-sentence` is `split-set-pair-img0.png` (left) and
`-img1.png` (right), found anywhere under the nlvr2 folder, preferring a folder named after the split
(images/train/<directory>/, images/dev/, dev/ ...).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.readers.common import (
    MalformedRecord,
    as_directory,
    check_split,
    find_file,
    locate_image,
    report_skips,
    require,
)
from fastvlp.data.records import Nlvr2Record
from fastvlp.data.skips import MALFORMED_ANNOTATION, ReadResult, SkipCounter

logger = logging.getLogger(__name__)
_LABELS = {"true": True, "false": False}


def _label(row: dict) -> bool | None:
    if "label" not in row:
        return None
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _LABELS:
        return _LABELS[value.lower()]
    raise MalformedRecord(f"label: expected 'True' or 'False', got {value!r}")


def image_stem(identifier: str) -> str:
    """'train-10-0-1' -> 'train-10-0', the prefix of both image file names."""
    parts = identifier.split("-")
    if len(parts) < 4 or not all(p.isdigit() for p in parts[-3:]):
        raise MalformedRecord(f"identifier: expected 'split-set-pair-sentence', got {identifier!r}")
    return "-".join(parts[:-1])


def read_nlvr2(
    nlvr2_dir: str | Path,
    split: str,
    *,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
) -> ReadResult[Nlvr2Record]:
    """One Nlvr2Record per line of `split`.json. Skipped and counted: lines that are not JSON or lack the
    identifier, sentence or a valid label, and examples with a missing (or, with `verify_images`,
    undecodable) left or right image."""
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    root = as_directory(nlvr2_dir, "nlvr2_dir")
    path = find_file([root, root / "data"], [f"{check_split(split)}.json"], "NLVR2 examples")
    index = image_index if image_index is not None else ImageIndex([root])
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                identifier = require(row, "identifier", str)
                sentence = require(row, "sentence", str).strip()
                label = _label(row)
                stem = image_stem(identifier)
            except (json.JSONDecodeError, MalformedRecord) as error:
                skips.add(MALFORMED_ANNOTATION, f"{path.name} line {line_number}: {error}")
                continue
            # One count per skipped example: the right image is only looked for when the left one is there.
            left = locate_image(index, skips, verify_images, f"{stem}-img0.png", None, split)
            right = left and locate_image(index, skips, verify_images, f"{stem}-img1.png", None, split)
            if left is not None and right is not None:
                records.append(Nlvr2Record(identifier, sentence, label, left, right, split))
    skips = report_skips(skips, caller_skips, logger, f"NLVR2 {path}")
    return ReadResult(records, skips)
