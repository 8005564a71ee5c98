"""VQA accuracy for each kind of question of the synthetic set, beside the question-type prior on the same
questions. VQA v2's question types put the background's colour and the objects' colours under one type
("what color is the"), and its answer types put existence and relations under yes/no, so neither tells
which of them a model answers from the image."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

from fastvlp.data.synth.questions import QUESTION_KINDS, question_kind
from fastvlp.eval.vqa_accuracy import vqa_accuracy


def accuracy_by_question_kind(
    predictions: Sequence[Mapping], eval_records: Sequence, train_records: Sequence
) -> Dict[str, Dict[str, float]]:
    """``{kind: {"questions", "accuracy", "question_type_prior"}}`` for every kind of
    :data:`~fastvlp.data.synth.questions.QUESTION_KINDS` that the predicted questions hold, in that order.

    ``predictions``: ``[{"question_id", "answer"}]`` (VQA's result format) for questions of ``eval_records``
    (VqaRecords); the prior is :func:`fastvlp.train.tasks.vqa.vqa_baselines`' question-type prior from
    ``train_records``. Raises ``ValueError`` naming ``eval_records`` when a predicted question is not one of
    the synthetic grammar's, and naming ``predictions`` when one names a question that is not in it."""
    from fastvlp.train.tasks.vqa import vqa_baselines  # the training side imports fastvlp.eval

    records = {record.question_id: record for record in eval_records}
    by_kind: Dict[str, list] = {}
    scores = {}
    for prediction in predictions:
        record = records.get(prediction["question_id"])
        if record is None:
            raise ValueError(f"predictions: question {prediction['question_id']!r} is not in eval_records")
        try:
            kind = question_kind(record.question)
        except ValueError as error:
            raise ValueError(f"eval_records: {error}") from None
        by_kind.setdefault(kind, []).append(record)
        scores[record.question_id] = vqa_accuracy(prediction["answer"], list(record.answers))
    result = {}
    for kind in QUESTION_KINDS:
        if kind in by_kind:
            mine = by_kind[kind]
            result[kind] = {
                "questions": len(mine),
                "accuracy": sum(scores[r.question_id] for r in mine) / len(mine),
                "question_type_prior": vqa_baselines(train_records, mine)["question_type_prior"],
            }
    return result
