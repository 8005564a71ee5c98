"""Counting what a reader or dataset leaves out, per reason, so that bad data is never silently dropped."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

MISSING_IMAGE = "missing_image"  # no image file for the annotation's file name or id
UNREADABLE_IMAGE = "unreadable_image"  # the file exists but does not decode (truncated, corrupt)
MALFORMED_ANNOTATION = "malformed_annotation"  # a JSON record with missing keys or wrong types
INVALID_BOX = "invalid_box"  # an object whose box has no area inside the image (the object is dropped)
UNKNOWN_IMAGE = "unknown_image"  # an annotation that names an image the file does not list
UNKNOWN_CATEGORY = "unknown_category"  # a COCO object whose category id is not in `categories`
NO_ANNOTATIONS = "no_annotations"  # an image or question without the annotations the task needs

T = TypeVar("T")


class SkipCounter:
    """Per-reason counts of skipped records, with the first few details of each reason."""

    max_examples = 5

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, detail: str = "") -> None:
        """Count one skip for `reason`; `detail` (a file name, an id) is kept for the first few."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason: expected a non-empty str, got {reason!r}")
        self._counts[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if detail and len(examples) < self.max_examples:
            examples.append(str(detail))

    def __getitem__(self, reason: str) -> int:
        return self._counts.get(reason, 0)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def examples(self, reason: str) -> list[str]:
        return list(self._examples.get(reason, []))

    def merge(self, other: SkipCounter, exclude: tuple[str, ...] = ()) -> None:
        """Add `other`'s counts (and examples, up to the limit) to this counter, except the `exclude` reasons."""
        if not isinstance(other, SkipCounter):
            raise TypeError(f"other: expected a SkipCounter, got {type(other).__name__}")
        for reason, count in other._counts.items():
            if reason in exclude:
                continue
            self._counts[reason] += count
            mine = self._examples.setdefault(reason, [])
            mine.extend(other._examples.get(reason, [])[: self.max_examples - len(mine)])

    def summary(self) -> str:
        if not self._counts:
            return "nothing skipped"
        parts = ", ".join(f"{reason}={count}" for reason, count in sorted(self._counts.items()))
        return f"{self.total} skipped: {parts}"

    def report(self, logger: logging.Logger, what: str) -> None:
        """Log a warning naming every reason and a few examples, when anything was skipped."""
        if self._counts:
            examples = "; ".join(
                f"{r}: {', '.join(self._examples[r])}" for r in sorted(self._examples) if self._examples[r]
            )
            logger.warning("%s: %s%s", what, self.summary(), f" (e.g. {examples})" if examples else "")

    def __repr__(self) -> str:
        return f"SkipCounter({self.summary()})"


@dataclass
class ReadResult(Generic[T]):
    """What a reader returns: the records it could read, and the counts of those it skipped."""

    records: list[T]
    skips: SkipCounter
    categories: tuple = field(default_factory=tuple)  # COCO instances only: the Category list

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[T]:
        return iter(self.records)
