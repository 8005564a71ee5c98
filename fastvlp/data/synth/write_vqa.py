"""VQA v2 question and annotation files over the synthetic COCO images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastvlp.data.synth.files import write_json
from fastvlp.data.synth.questions import QuestionPlan, annotator_answers, ask_questions
from fastvlp.data.synth.synth_image import SynthImage

_INFO = {"description": "fastvlp synthetic shapes VQA", "version": "2.0", "year": 2017}
_LICENSE = {"name": "synthetic", "url": ""}
# VQA numbers its questions image_id * 1000 + k; leaving room for more questions per image.
_QUESTION_ID_STRIDE = 1000


def write_vqa(root: Path, images: list[SynthImage], plans: dict[int, QuestionPlan], seed: int) -> dict[str, int]:
    """Write the question and annotation files for the COCO folders 'train' and 'val'.
    `plans` maps a COCO image id to the plan its scene was built from. Returns questions per split."""
    counts = {}
    for split in ("train", "val"):
        questions, annotations = [], []
        for image in (image for image in images if image.folder == split):
            rng = np.random.default_rng([seed, 5, image.image_id])
            for k, question in enumerate(ask_questions(rng, image.scene, plans[image.image_id])):
                question_id = image.image_id * _QUESTION_ID_STRIDE + k
                questions.append(
                    {"image_id": image.image_id, "question": question.question, "question_id": question_id}
                )
                annotations.append(
                    {
                        "question_type": question.question_type,
                        "multiple_choice_answer": question.answer,
                        "answers": annotator_answers(rng, question.answer, question.answer_type),
                        "image_id": image.image_id,
                        "answer_type": question.answer_type,
                        "question_id": question_id,
                    }
                )
        common = {"info": _INFO, "license": _LICENSE, "data_subtype": split, "data_type": "mscoco"}
        write_json(
            root / f"v2_OpenEnded_mscoco_{split}_questions.json",
            {**common, "task_type": "Open-Ended", "questions": questions},
        )
        write_json(root / f"v2_mscoco_{split}_annotations.json", {**common, "annotations": annotations})
        counts[split] = len(questions)
    return counts
