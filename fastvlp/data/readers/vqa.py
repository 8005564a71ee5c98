"""VQA v2: questions and (where the split has them) annotations, on the COCO images.

Files: `vqa/v2_OpenEnded_mscoco_<split>_questions.json` and `vqa/v2_mscoco_<split>_annotations.json`, with
`<split>` as ours ('train') or published ('train2014', 'test-dev2015'). Images are found under the coco
folder by the question's COCO image id.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from fastvlp.data.image_index import ImageIndex
from fastvlp.data.readers.common import (
    MalformedRecord,
    as_directory,
    check_split,
    file_section,
    find_file,
    load_json,
    locate_image,
    report_skips,
    require,
    split_base,
    split_names,
)
from fastvlp.data.records import VqaRecord
from fastvlp.data.skips import MALFORMED_ANNOTATION, NO_ANNOTATIONS, ReadResult, SkipCounter

logger = logging.getLogger(__name__)


def _majority_answer(answers: tuple[str, ...]) -> str:
    # VQA defines multiple_choice_answer as the most frequent of the ten answers and documents no tie rule;
    # a tie goes to the answer listed first, so the derived value does not depend on hashing or sorting.
    return Counter(answers).most_common(1)[0][0]


def _annotations(path: Path, skips: SkipCounter) -> tuple[dict[int, tuple], set[int]]:
    """Question id -> (answers, multiple-choice answer, question type, answer type), and the ids of the
    questions whose annotation was malformed (counted here, so that their questions are not counted again)."""
    table, malformed = {}, set()
    for entry in file_section(load_json(path), "annotations", list, path):
        try:
            question_id = require(entry, "question_id", int)
            answers = tuple(require(answer, "answer", str) for answer in require(entry, "answers", list))
            if not answers:
                raise MalformedRecord("no answers")
            chosen = entry.get("multiple_choice_answer")
            if chosen is None:
                chosen = _majority_answer(answers)
            elif not isinstance(chosen, str):
                raise MalformedRecord(f"key 'multiple_choice_answer': expected a str, got {type(chosen).__name__}")
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"answer: {error}")
            question_id = entry.get("question_id") if isinstance(entry, dict) else None
            if isinstance(question_id, int) and not isinstance(question_id, bool):
                malformed.add(question_id)
            continue
        table[question_id] = (answers, chosen, entry.get("question_type"), entry.get("answer_type"))
    return table, malformed


def read_vqa(
    vqa_dir: str | Path,
    coco_dir: str | Path,
    split: str,
    *,
    skips: SkipCounter | None = None,
    verify_images: bool = False,
    image_index: ImageIndex | None = None,
    require_answers: bool | None = None,
) -> ReadResult[VqaRecord]:
    """One VqaRecord per question of `split`, with its ten answers when the annotation file exists.

    `require_answers` (default: whether the annotation file exists) skips questions without answers. An
    annotation without `multiple_choice_answer` gets its most frequent answer (ties: the first listed).
    Skipped and counted once each: malformed questions or answers, unanswered questions when answers are
    required, questions whose image is missing or (with `verify_images`) does not decode.
    """
    caller_skips, skips = skips, SkipCounter()  # this read's own skips: see report_skips
    root = as_directory(vqa_dir, "vqa_dir")
    names = split_names(check_split(split))
    questions_path = find_file([root], [f"v2_OpenEnded_mscoco_{n}_questions.json" for n in names], "VQA questions")
    try:
        annotations_path = find_file([root], [f"v2_mscoco_{n}_annotations.json" for n in names], "VQA answers")
    except FileNotFoundError:
        annotations_path = None
    if require_answers is None:
        require_answers = annotations_path is not None
    if require_answers and annotations_path is None:
        raise FileNotFoundError(f"require_answers: no VQA annotation file for split {split!r} in {root}")
    answers, malformed = _annotations(annotations_path, skips) if annotations_path is not None else ({}, set())

    index = image_index if image_index is not None else ImageIndex([as_directory(coco_dir, "coco_dir")])
    records = []
    for entry in file_section(load_json(questions_path), "questions", list, questions_path):
        try:
            question_id = require(entry, "question_id", int)
            image_id = require(entry, "image_id", int)
            question = require(entry, "question", str).strip()
        except MalformedRecord as error:
            skips.add(MALFORMED_ANNOTATION, f"question: {error}")
            continue
        answered = answers.get(question_id)
        if answered is None and require_answers:
            if question_id not in malformed:  # else its loss is already counted, as a malformed annotation
                skips.add(NO_ANNOTATIONS, f"question {question_id}")
            continue
        image_path = locate_image(index, skips, verify_images, None, image_id, split_base(split))
        if image_path is None:
            continue
        if answered is None:
            records.append(VqaRecord(question_id, image_id, image_path, question))
        else:
            all_answers, chosen, question_type, answer_type = answered
            records.append(
                VqaRecord(question_id, image_id, image_path, question, all_answers, chosen, question_type, answer_type)
            )
    skips = report_skips(skips, caller_skips, logger, f"VQA {questions_path}")
    return ReadResult(records, skips)
