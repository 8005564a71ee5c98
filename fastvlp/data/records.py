"""Plain records that the readers return. Images are referred to by path and decoded later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ObjectAnnotation:
    """One annotated object. `box` is (x0, y0, x1, y1) in pixels of the original image."""

    box: tuple[float, float, float, float]
    name: str  # the category name (COCO) or the first object name, normalised (Visual Genome)
    attributes: tuple[str, ...] = ()
    category_id: int | None = None  # COCO's category id; None for Visual Genome
    object_id: int | None = None
    iscrowd: bool = False


@dataclass(frozen=True)
class ImageRecord:
    """An image with its captions and/or objects (COCO, Visual Genome, Karpathy-format files)."""

    source: str  # "coco", "vg" or "flickr30k"
    image_id: int
    image_path: Path
    width: int | None = None
    height: int | None = None
    split: str = ""  # the reader's split; Karpathy files: "train", "val", "test" or "restval"
    captions: tuple[str, ...] = ()
    objects: tuple[ObjectAnnotation, ...] = ()
    coco_id: int | None = None  # Visual Genome images that are also COCO images


@dataclass(frozen=True)
class VqaRecord:
    """A VQA v2 question; `answers` are the ten annotators' answers (empty for unannotated splits)."""

    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: tuple[str, ...] = ()
    multiple_choice_answer: str | None = None
    question_type: str | None = None
    answer_type: str | None = None


@dataclass(frozen=True)
class Nlvr2Record:
    """An NLVR2 sentence about a left and a right image; `label` is None where the file has none."""

    identifier: str
    sentence: str
    label: bool | None
    left_image_path: Path
    right_image_path: Path
    split: str


@dataclass(frozen=True)
class Category:
    """A COCO category."""

    id: int
    name: str
    supercategory: str = ""
