"""Pre-training data: the coco + vg corpus with its tokenizer and label spaces, samples that are a pure
function of (seed, epoch, index), and the collation of samples into a :class:`PretrainingBatch`."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.data.collate import nested_tensor_from_images
from fastvlp.data.datasets.image_records import ImageRecordDataset, ImageRecordView
from fastvlp.data.exclusion import filter_excluded, read_excluded_images
from fastvlp.data.label_space import LabelSpace
from fastvlp.data.pretraining import read_pretraining_images
from fastvlp.data.records import ImageRecord
from fastvlp.data.skips import NO_ANNOTATIONS
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import ImageTransform
from fastvlp.models.pretraining_batch import PretrainingBatch, make_pretraining_batch
from fastvlp.train.seeded_samples import SeededSamples

logger = logging.getLogger(__name__)

OBJECTS_VOCAB = "objects_vocab.txt"
ATTRIBUTES_VOCAB = "attributes_vocab.txt"
CATEGORY_MAP = "category_map.json"
TOKENIZER = "tokenizer.json"


@dataclass
class PretrainingCorpus:
    """The records to train on, and what reading them left out."""

    records: List[ImageRecord]
    skipped_while_indexing: int  # records rejected by the readers, or without captions
    skip_summary: str
    excluded: int = 0
    categories: tuple = ()
    exclusion: Dict[str, Any] = field(default_factory=dict)  # what --exclude-images did (read_corpus)


def read_corpus(data_dir: Path, exclude_images: Optional[Path] = None) -> PretrainingCorpus:
    """COCO (train split) + Visual Genome under ``data_dir``, minus the images listed in ``exclude_images``
    (matched by file name, and by COCO id, bare or from a published COCO name, against COCO images and VG
    images' COCO ids; a bare number is a COCO image id, so a Visual Genome image is left out by its file
    name). Records without any caption are skipped and counted: every task but detection needs text.
    ``exclusion`` reports what the list did (its entries, the images left out, the entries that matched no
    image, the file's SHA-256); empty without a list."""
    result = read_pretraining_images(data_dir)
    skips = result.skips
    records = list(result.records)
    exclusion: Dict[str, Any] = {}
    if exclude_images is not None:
        records, exclusion = _exclude(records, Path(exclude_images))
    captioned = []
    for record in records:
        if record.captions:
            captioned.append(record)
        else:
            skips.add(NO_ANNOTATIONS, f"{record.source}:{record.image_id} (no captions)")
    skips.report(logger, "pre-training records")
    if not captioned:
        raise ValueError(f"data_dir: no captioned image to pre-train on under {data_dir}")
    return PretrainingCorpus(captioned, skips.total, skips.summary(), exclusion.get("left_out", 0),
                             tuple(result.categories), exclusion)


def _exclude(records: List[ImageRecord], path: Path) -> Tuple[List[ImageRecord], Dict[str, Any]]:
    """``records`` without the images ``path`` lists, and the report of :func:`read_corpus`; the entries that
    match no image (a misspelt name, a Visual Genome id) are logged, so a wrong list does not pass unseen."""
    listed = read_excluded_images(path)
    matched: set = set()
    coco, left_coco = filter_excluded([r for r in records if r.source == "coco"], listed, "image_id", matched)
    others, left_others = filter_excluded([r for r in records if r.source != "coco"], listed, "coco_id", matched)
    unmatched = [entry for entry in listed.entries if entry not in matched]
    exclusion = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                 "left_out": left_coco + left_others, "entries": len(listed.entries),
                 "unmatched_entries": len(unmatched)}
    logger.info("--exclude-images: left out %d images listed in %s; %d of its %d entries matched no image",
                exclusion["left_out"], path, len(unmatched), len(listed.entries))
    if unmatched:
        logger.warning("entries of %s that matched no image (a bare number is a COCO image id; a Visual Genome "
                       "image is left out by its file name): %s%s", path, ", ".join(unmatched[:10]),
                       f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
    return coco + others, exclusion


def build_label_spaces(data_dir: Path, corpus: PretrainingCorpus):
    """(object classes, attribute space or None, COCO category id -> class). VG's objects_vocab.txt and
    attributes_vocab.txt when present, else built from the annotations; COCO categories mapped by name."""
    vg = Path(data_dir) / "vg"
    if (vg / OBJECTS_VOCAB).is_file():
        classes = LabelSpace.from_vocab_file(vg / OBJECTS_VOCAB)
    else:
        classes = LabelSpace.from_names(o.name for r in corpus.records if r.source != "coco" for o in r.objects)
    if (vg / ATTRIBUTES_VOCAB).is_file():
        attributes = LabelSpace.from_vocab_file(vg / ATTRIBUTES_VOCAB)
    else:
        attributes = LabelSpace.from_names(a for r in corpus.records for o in r.objects for a in o.attributes)
    classes, category_map = classes.with_coco_categories(corpus.categories)
    if len(classes) == 0:
        raise ValueError(f"data_dir: no object class found under {data_dir} (no objects_vocab.txt and no objects)")
    return classes, (attributes if len(attributes) else None), category_map


def save_label_spaces(directory: Path, classes: LabelSpace, attributes: Optional[LabelSpace], category_map: Dict[int, int]) -> None:
    directory = Path(directory)
    classes.save(directory / OBJECTS_VOCAB)
    if attributes is not None:
        attributes.save(directory / ATTRIBUTES_VOCAB)
    (directory / CATEGORY_MAP).write_text(json.dumps({str(k): v for k, v in sorted(category_map.items())}), encoding="utf-8")


def load_label_spaces(directory: Path):
    directory = Path(directory)
    classes = LabelSpace.from_vocab_file(directory / OBJECTS_VOCAB)
    attributes = LabelSpace.from_vocab_file(directory / ATTRIBUTES_VOCAB) if (directory / ATTRIBUTES_VOCAB).is_file() else None
    category_map = {int(k): v for k, v in json.loads((directory / CATEGORY_MAP).read_text(encoding="utf-8")).items()}
    return classes, attributes, category_map


def check_resumed_vocabulary(vocab: Optional[Path], checkpoint: Path) -> None:
    """On resume, a ``--vocab`` must be the vocabulary of the run's own tokenizer (restored from
    ``checkpoint``): the same command line resumes, another vocabulary is refused, never ignored."""
    if vocab is None:
        return
    run_vocab = WordPieceTokenizer.load(Path(checkpoint) / TOKENIZER).backend.get_vocab(with_added_tokens=True)
    if WordPieceTokenizer.from_vocab_file(vocab).backend.get_vocab(with_added_tokens=True) != run_vocab:
        raise ValueError(f"--vocab: {vocab} is not the vocabulary of the run's tokenizer; leave it out (the run's "
                         f"tokenizer is restored from {checkpoint}), or choose another --out")


def build_tokenizer(corpus: PretrainingCorpus, vocab: Optional[Path], vocab_size: int = 8000) -> WordPieceTokenizer:
    """BERT's vocab.txt when given, else a WordPiece vocabulary trained on the training captions."""
    if vocab is not None:
        return WordPieceTokenizer.from_vocab_file(vocab)
    # The same captions always give the same vocabulary (frequency order, ties alphabetical); a resumed run
    # still reads the one saved with the run, since the data folder or the exclusions may have changed.
    return WordPieceTokenizer.train_on_texts((c for r in corpus.records for c in r.captions), vocab_size=vocab_size)


class _PretrainingRecords(ImageRecordView):
    """Image ``index`` transformed, with its detection target, a text and a caption drawn from its captions
    with torch's RNG; a :class:`SkippedSample` when the image does not decode."""

    def __init__(self, records: Sequence[ImageRecord], transform: ImageTransform, classes: LabelSpace,
                 attributes: Optional[LabelSpace], category_map: Dict[int, int]) -> None:
        super().__init__(ImageRecordDataset(records, transform, classes, attributes, category_map))

    def view(self, sample, index: int):
        captions = sample["captions"]
        picks = torch.randint(len(captions), (2,)).tolist()
        record = self.records[index]
        return {
            "image": sample["image"],
            "text": captions[picks[0]],
            "caption": captions[picks[1]],
            "target": {
                "labels": sample["labels"],
                "boxes": sample["boxes"],
                **({"attributes": sample["attributes"]} if sample["attributes"].shape[1] else {}),
            } if record.objects else None,
            "image_key": picture_key(record),
            # Objects the target leaves out, for the run's log: a class outside the label space (Visual
            # Genome's names beyond its 1600 classes), or a box outside the decoded image.
            "dropped_objects": (index, sample["unlabelled_objects"], sample["empty_boxes"], str(record.image_path))
            if sample["unlabelled_objects"] or sample["empty_boxes"] else None,
        }


def picture_key(record: ImageRecord) -> str:
    """One key per picture across data sets: a Visual Genome image that is also a COCO image (its
    ``coco_id``) gets the COCO image's key, so ITM never pairs a text of that picture as a mismatch."""
    if record.coco_id is not None:
        return f"coco:{record.coco_id}"
    return f"{record.source}:{record.image_id}"


class PretrainingSamples(SeededSamples):
    """Item ``(epoch, index)``: the transformed image ``index`` with its detection target, a text and a
    caption drawn from its captions. All randomness (scale, choice of captions) is seeded by
    ``(seed, epoch, index)``, so a sample does not depend on worker processes or on what ran before,
    and the caller's global RNG is left untouched.

    An image that does not decode is replaced by the next readable index (so that every batch and every
    rank keeps its size) and reported in the sample's ``skipped`` list as ``(index, reason, path)``."""

    def __init__(self, records: Sequence[ImageRecord], transform: ImageTransform, classes: LabelSpace,
                 attributes: Optional[LabelSpace], category_map: Dict[int, int], seed: int = 0) -> None:
        super().__init__(_PretrainingRecords(records, transform, classes, attributes, category_map), seed)


def collate_pretraining_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Images padded into one tensor with a pixel mask; the rest as lists."""
    images = nested_tensor_from_images([s["image"] for s in samples])
    return {
        "images": images.tensors,
        "pixel_mask": images.mask,
        "texts": [s["text"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "targets": [s["target"] for s in samples],
        "image_keys": [s["image_key"] for s in samples],
        "skipped": [entry for s in samples for entry in s["skipped"]],
        "dropped_objects": [s["dropped_objects"] for s in samples if s.get("dropped_objects")],
    }


@dataclass
class BatchBuilder:
    """Tokenises a collated batch and builds the MLM/ITM inputs with :func:`make_pretraining_batch`."""

    tokenizer: WordPieceTokenizer
    mlm_probability: float = 0.15
    itm_negative_ratio: float = 0.5
    special_ids: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        t = self.tokenizer
        self.special_ids = [t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id]

    def __call__(self, collated: Dict[str, Any], generator: torch.Generator) -> PretrainingBatch:
        text = self.tokenizer.encode_batch(collated["texts"])
        caption = self.tokenizer.encode_batch(collated["captions"])
        return make_pretraining_batch(
            collated["images"],
            collated["pixel_mask"],
            text.input_ids,
            text.attention_mask,
            special_token_ids=self.special_ids,
            mask_token_id=self.tokenizer.mask_id,
            vocab_size=self.tokenizer.vocab_size,
            caption_ids=caption.input_ids,
            caption_attention_mask=caption.attention_mask,
            targets=collated["targets"],
            image_ids=collated["image_keys"],
            generator=generator,
            mlm_probability=self.mlm_probability,
            itm_negative_ratio=self.itm_negative_ratio,
        )
