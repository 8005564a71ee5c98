"""Karpathy-format split files (dataset_coco.json, dataset_flickr30k.json): captioning and retrieval splits.

Each entry gives an image's `filename` (and, for COCO, `filepath` and `cocoid`), its `split` ('train',
'val', 'test' or 'restval') and its `sentences`. Images are found under the data set's folder by file
name, then by id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from fastvlp.data.image_index import ImageIndex, image_id_from_name
from fastvlp.data.readers.common import (
    MalformedRecord,
    as_directory,
    file_section,
    find_file,
    load_json,
    locate_image,
    report_skips,
    require,
)
from fastvlp.data.records import ImageRecord
from fastvlp.data.skips import MALFORMED_ANNOTATION, NO_ANNOTATIONS, ReadResult, SkipCounter

logger = logging.getLogger(__name__)
KARPATHY_SPLITS = ("train", "val", "test", "restval")


def _sentences(entry: dict) -> tuple[str, ...]:
    texts = []
    for sentence in require(entry, "sentences", list):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if isinstance(raw, str) and raw.strip():
            texts.append(raw.strip())
        elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
            texts.append(" ".join(str(t) for t in sentence["tokens"]))
        else:
            raise MalformedRecord("sentence without 'raw' or 'tokens'")
    return tuple(t for t in texts if t)


def read_karpathy_file(
    path: str | Path,
    image_root: str | Path,
    *,
    source: str,
    splits: Iterable[str] | None = None,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
) -> ReadResult[ImageRecord]:
    """ImageRecords of the entries whose split is in `splits` (all when None), with their sentences as
    captions. `image_id` is the entry's `cocoid`, else the number in its file name, else its `imgid`.
    Skipped and counted once each: malformed entries (of the wanted splits, or whose split is unreadable),
    entries without sentences, missing or undecodable images."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a str or Path, got {type(path).__name__}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source: expected a data set name such as 'coco', got {source!r}")
    wanted = None if splits is None else set(splits)
    if wanted is not None and not wanted <= set(KARPATHY_SPLITS):
        raise ValueError(f"splits: expected a subset of {KARPATHY_SPLITS}, got {sorted(wanted)}")
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    path = Path(path)
    index = image_index if image_index is not None else ImageIndex([as_directory(image_root, "image_root")])
    records = []
    for entry in file_section(load_json(path), "images", list, path):
        # Entries of other splits are not read, so their defects are not counted; an entry whose split cannot
        # be read might be one that was asked for, and is counted as malformed below.
        named_split = entry.get("split") if isinstance(entry, dict) else None
        if wanted is not None and isinstance(named_split, str) and named_split not in wanted:
            continue
        try:
            file_name = require(entry, "filename", str)
            split = require(entry, "split", str)
            captions = _sentences(entry)
            image_id = entry.get("cocoid")
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                image_id = image_id_from_name(file_name)
            if image_id is None:
                image_id = require(entry, "imgid", int)
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"{path.name}: {error}")
            continue
        if not captions:
            skips.add(NO_ANNOTATIONS, file_name)
            continue
        folder = entry.get("filepath") if isinstance(entry.get("filepath"), str) else None
        image_path = locate_image(index, skips, verify_images, file_name, image_id, folder)
        if image_path is not None:
            records.append(ImageRecord(source, image_id, image_path, split=split, captions=captions))
    skips = report_skips(skips, caller_skips, logger, f"Karpathy split file {path}")
    return ReadResult(records, skips)


def read_coco_karpathy(coco_dir: str | Path, splits: Iterable[str] | None = None, **options) -> ReadResult[ImageRecord]:
    """`read_karpathy_file` on coco/dataset_coco.json (also looked for in coco/karpathy/ and
    coco/annotations/), with the images under coco/."""
    root = as_directory(coco_dir, "coco_dir")
    path = find_file([root, root / "karpathy", root / "annotations"], ["dataset_coco.json"], "COCO Karpathy split")
    return read_karpathy_file(path, root, source="coco", splits=splits, **options)


def read_flickr30k(flickr_dir: str | Path, splits: Iterable[str] | None = None, **options) -> ReadResult[ImageRecord]:
    """`read_karpathy_file` on flickr30k/dataset_flickr30k.json (also in karpathy/), with the images under
    flickr30k/ (images/ or the published flickr30k-images/)."""
    root = as_directory(flickr_dir, "flickr_dir")
    path = find_file([root, root / "karpathy"], ["dataset_flickr30k.json"], "Flickr30k Karpathy split")
    return read_karpathy_file(path, root, source="flickr30k", splits=splits, **options)
