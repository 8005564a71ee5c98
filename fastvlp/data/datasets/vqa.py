"""A torch Dataset over VqaRecords, with VQA's soft answer scores over a fixed answer vocabulary."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from fastvlp.data.datasets.skipped import SkippedSample
from fastvlp.data.images import UnreadableImageError, load_rgb_image
from fastvlp.data.records import VqaRecord
from fastvlp.data.transforms import ImageTransform

# Score of an answer given by 0, 1, 2, 3, 4 or more of the ten annotators.
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)
NUM_ANSWERS = 3129


def _identity(answer: str) -> str:
    return answer


def build_answer_vocabulary(
    records: Sequence[VqaRecord], max_answers: int = NUM_ANSWERS, normalise: Callable[[str], str] = _identity
) -> list[str]:
    """The `max_answers` most frequent (normalised) multiple-choice answers, ties in alphabetical order."""
    if isinstance(max_answers, bool) or not isinstance(max_answers, int) or max_answers < 1:
        raise ValueError(f"max_answers: expected a positive int, got {max_answers!r}")
    counts = Counter(normalise(r.multiple_choice_answer) for r in records if r.multiple_choice_answer is not None)
    return [answer for answer, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_answers]]


def soft_scores(
    answers: Sequence[str], answer_to_index: dict[str, int], normalise: Callable[[str], str] = _identity
) -> torch.Tensor:
    """[len(answer_to_index)] float32 target: SOFT_SCORES[number of annotators] for each answer in the
    vocabulary; answers outside it contribute nothing."""
    target = torch.zeros(len(answer_to_index), dtype=torch.float32)
    for answer, count in Counter(normalise(a) for a in answers).items():
        if answer in answer_to_index:
            target[answer_to_index[answer]] = SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]
    return target


class VqaDataset(Dataset):
    """Sample i: image, question, question_id, image_id, answers (the ten raw answers), target (soft
    scores over `answer_vocabulary`; empty when no vocabulary is given), size. SkippedSample when the
    image does not decode. `normalise` maps raw answers into the vocabulary's form (e.g. VQA's official
    answer processing). Flips are refused: questions and answers name left and right, and flipping the
    image would not swap them."""

    def __init__(
        self,
        records: Sequence[VqaRecord],
        transform: ImageTransform,
        answer_vocabulary: Sequence[str] | None = None,
        normalise: Callable[[str], str] = _identity,
    ) -> None:
        if not isinstance(transform, ImageTransform):
            raise TypeError(f"transform: expected an ImageTransform, got {type(transform).__name__}")
        if transform.horizontal_flip:
            raise ValueError("transform: expected no horizontal flip for VQA")
        if any(not isinstance(r, VqaRecord) for r in records):
            raise TypeError("records: expected VqaRecord items")
        self.records, self.transform, self.normalise = list(records), transform, normalise
        vocabulary = list(answer_vocabulary or [])
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("answer_vocabulary: expected distinct answers")
        self.answer_to_index = {answer: i for i, answer in enumerate(vocabulary)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            image = load_rgb_image(record.image_path)
        except UnreadableImageError as error:
            return SkippedSample(index, error.reason, str(record.image_path))
        out = self.transform(image)
        return {
            "image": out.image,
            "question": record.question,
            "question_id": record.question_id,
            "image_id": record.image_id,
            "answers": list(record.answers),
            "target": soft_scores(record.answers, self.answer_to_index, self.normalise),
            "size": out.size,
        }
