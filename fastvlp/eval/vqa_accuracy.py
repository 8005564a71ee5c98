"""The official VQA accuracy (Antol et al., 2015; VQA v2 evaluation).

An answer scores ``min(1, matches / 3)`` against the human answers, averaged over every leave-one-out
subset of them (each annotator left out in turn), so 3 matching annotators out of 10 give 0.9, not 1.

Answers are compared after the official normalisation: newlines/tabs to spaces and stripped; then
punctuation handled (dropped when it touches a space or the text has a digit-comma-digit, otherwise
replaced by a space; periods dropped unless a digit follows); lower case; number words to digits
("two" -> "2", "none" -> "0"); articles removed; apostrophe-less contractions restored ("dont" -> "don't").
The official script applies that normalisation only when the annotators gave more than one distinct
answer; when they all agree it compares the answers with newlines/tabs turned to spaces and stripped, and
nothing else (so case matters: "Yes" does not match "yes"). ``normalize="official"`` reproduces that,
``normalize="always"`` normalises every question.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Sequence, Union

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset(("a", "an", "the"))

# The contractions the official rules restore. A form with one apostrophe is recognised without it
# ("dont"); a form with several is recognised with exactly one of them missing ("couldnt've",
# "couldn'tve"), as in the official table. Forms the official table writes with a capital letter
# ("Im", "Ive") can never match lower-cased words there, so they are left out here too.
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
    "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
    "you'd you'll you're you've couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
    "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll "
    "y'all'd've you'd've 'ow's'at"
).split()


def _contraction_table() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for word in _CONTRACTED:
        apostrophes = [index for index, char in enumerate(word) if char == "'"]
        if len(apostrophes) == 1:
            table[word.replace("'", "")] = word
        else:
            for index in apostrophes:
                table[word[:index] + word[index + 1:]] = word
    table["somebody'd"] = "somebodyd"  # the official table maps this one backwards; kept for equal scores
    return table


_CONTRACTIONS = _contraction_table()


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    # Every decision looks at the original text, as the official rules do.
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if drop_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official answer normalisation (module docstring), e.g. ``"Two dogs."`` -> ``"2 dogs"``."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    return _digits_articles_contractions(_strip_punctuation(_clean_whitespace(text)))


def _check_normalize(normalize: str) -> None:
    if normalize not in ("official", "always"):
        raise ValueError(f"normalize: expected 'official' or 'always', got {normalize!r}")


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize: str = "official") -> float:
    """VQA accuracy in [0, 1] of ``prediction`` against the human ``answers`` (usually 10)."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction: expected str, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError("answers: expected a non-empty sequence of answer strings")
    if not all(isinstance(answer, str) for answer in answers):
        raise TypeError("answers: expected every answer to be a str")
    _check_normalize(normalize)
    truths = [_clean_whitespace(answer) for answer in answers]
    guess = _clean_whitespace(prediction)
    # Only the normalisation lower-cases: answers the annotators agree on are compared case-sensitively.
    if normalize == "always" or len(set(truths)) > 1:
        truths = [normalize_vqa_answer(answer) for answer in truths]
        guess = normalize_vqa_answer(guess)
    hits = [truth == guess for truth in truths]
    total_hits = sum(hits)
    # Leaving annotator i out removes their own hit from the count.
    return sum(min(1.0, (total_hits - hit) / 3.0) for hit in hits) / len(hits)


def _answers_by_question(annotations) -> Dict[object, dict]:
    """{question_id: {"answers": [...], "answer_type": ...}} from the accepted annotation layouts."""
    if isinstance(annotations, Mapping) and "annotations" in annotations:
        annotations = annotations["annotations"]
    table: Dict[object, dict] = {}
    if isinstance(annotations, Mapping):
        for question_id, answers in annotations.items():
            if isinstance(answers, str) or not isinstance(answers, Sequence):
                raise ValueError(f"annotations: question {question_id!r}: expected a list of answers")
            table[question_id] = {"answers": [a["answer"] if isinstance(a, Mapping) else a for a in answers]}
        return table
    if not isinstance(annotations, Iterable):
        raise TypeError("annotations: expected a {question_id: answers} mapping, a VQA annotation file dict or a list of records")
    for record in annotations:
        if not isinstance(record, Mapping) or "question_id" not in record or "answers" not in record:
            raise ValueError("annotations: each record needs 'question_id' and 'answers'")
        table[record["question_id"]] = {
            "answers": [a["answer"] if isinstance(a, Mapping) else a for a in record["answers"]],
            "answer_type": record.get("answer_type"),
        }
    return table


def vqa_accuracy_score(
    predictions: Mapping[object, str], annotations, *, normalize: str = "official"
) -> Dict[str, Union[float, int, Dict[str, float]]]:
    """Mean VQA accuracy of ``predictions`` ``{question_id: answer}``.

    ``annotations``: ``{question_id: [answers]}``, the official annotation file's dict (``{"annotations":
    [...]}``) or its list of records (``question_id``, ``answers`` as strings or ``{"answer": ...}``,
    optional ``answer_type``). Returns ``accuracy`` (mean over the predicted questions), ``count``,
    ``missing`` (annotated questions without a prediction) and ``per_answer_type`` when types are given.
    A prediction for a question that has no annotation raises ``ValueError``.
    """
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions: expected a {{question_id: answer}} mapping, got {type(predictions).__name__}")
    table = _answers_by_question(annotations)
    unknown = [question_id for question_id in predictions if question_id not in table]
    if unknown:
        raise ValueError(f"predictions: {len(unknown)} question ids have no annotation, e.g. {unknown[0]!r}")
    scores: List[float] = []
    by_type: Dict[str, List[float]] = defaultdict(list)
    for question_id, answer in predictions.items():
        score = vqa_accuracy(answer, table[question_id]["answers"], normalize=normalize)
        scores.append(score)
        answer_type = table[question_id].get("answer_type")
        if answer_type is not None:
            by_type[answer_type].append(score)
    result: Dict[str, Union[float, int, Dict[str, float]]] = {
        "accuracy": sum(scores) / len(scores) if scores else 0.0,
        "count": len(scores),
        "missing": len(table) - len(scores),
    }
    if by_type:
        result["per_answer_type"] = {name: sum(values) / len(values) for name, values in sorted(by_type.items())}
    return result
